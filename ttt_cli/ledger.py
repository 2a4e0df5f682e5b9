"""Every input of a run accounted for: each ends done, or skipped with a reason (SPEC §7, §7.1)."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from .io import shown

DONE, SKIPPED, PENDING = "done", "skipped", "pending"


@dataclass
class InputRecord:
    """What became of one input."""

    path: str
    status: str = PENDING
    reason: str | None = None
    failed: bool = False       # skipped because something was wrong (counts for exit 1), not by a filter
    warnings: list[str] = field(default_factory=list)


class InputLedger:
    """Every input of a run, each ending in exactly one of done or skipped-with-a-reason.

    Args:
        paths: the inputs, in order; `keys` (default: their index) name them in later calls.
    """

    def __init__(self, paths: tp.Sequence[Path | str] = (), keys: tp.Sequence[tp.Hashable] | None = None):
        self.records: dict[tp.Hashable, InputRecord] = {}
        for k, p in zip(keys if keys is not None else range(len(paths)), paths):
            self.add(k, p)

    def add(self, key: tp.Hashable, path: Path | str) -> None:
        self.records[key] = InputRecord(shown(path))

    def done(self, key: tp.Hashable, warnings: tp.Iterable[str] = ()) -> None:
        r = self.records[key]
        r.status, r.reason, r.failed = DONE, None, False
        r.warnings += [w for w in warnings if w not in r.warnings]

    def skip(self, key: tp.Hashable, reason: str, failed: bool = True) -> None:
        r = self.records[key]
        r.status, r.reason, r.failed = SKIPPED, reason.strip().rstrip("."), failed

    def warn(self, key: tp.Hashable, warning: str) -> None:
        if warning not in self.records[key].warnings:
            self.records[key].warnings.append(warning)

    def not_run(self, reason: str) -> list[InputRecord]:
        """Marks every input still pending as skipped, "not run: <reason>"; returns them."""
        rest = [r for r in self.records.values() if r.status == PENDING]
        for r in rest:
            r.status, r.reason, r.failed = SKIPPED, f"not run: {reason}", True
        return rest

    @property
    def pending(self) -> list[InputRecord]:
        return [r for r in self.records.values() if r.status == PENDING]

    @property
    def done_records(self) -> list[InputRecord]:
        return [r for r in self.records.values() if r.status == DONE]

    @property
    def skipped(self) -> list[InputRecord]:
        return [r for r in self.records.values() if r.status == SKIPPED]

    @property
    def failed(self) -> list[InputRecord]:
        return [r for r in self.records.values() if r.status == SKIPPED and r.failed]

    @property
    def exit_code(self) -> int:
        """1 when some input failed (or was not run), else 0."""
        return 1 if self.failed or self.pending else 0

    def to_dict(self) -> dict:
        return {"total": len(self.records), "done": [r.path for r in self.done_records],
                "skipped": [{"path": r.path, "reason": r.reason, "failed": r.failed} for r in self.skipped],
                "warnings": [{"path": r.path, "warning": w} for r in self.records.values() for w in r.warnings]}

    def summary(self) -> str:
        """One line: counts, then each skipped input with its reason."""
        n = len(self.records)
        head = f"{len(self.done_records)} of {n} input(s) done"
        if self.skipped:
            head += f", {len(self.skipped)} skipped: " + "; ".join(f"{r.path}: {r.reason}" for r in self.skipped)
        return head + "."
