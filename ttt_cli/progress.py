"""Progress reporting through an injected hook: rich on a terminal, plain lines otherwise, on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
import typing as tp

from rich.console import Console
from rich.progress import BarColumn, Progress as RichBars, TextColumn, TimeRemainingColumn


class Progress(tp.Protocol):
    """What library code calls; the CLI picks the implementation."""

    def start(self, key: str, description: str, total: float | None) -> None: ...
    def update(self, key: str, completed: float, **info: tp.Any) -> None: ...  # info `total=` moves the total
    def finish(self, key: str, **info: tp.Any) -> None: ...
    def log(self, message: str) -> None: ...


class NullProgress:
    def start(self, key, description, total): pass
    def update(self, key, completed, **info): pass
    def finish(self, key, **info): pass
    def log(self, message): pass


def _fmt(info: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())


class PlainProgress:
    """One line per start/finish and at most one update line every `interval` seconds."""

    def __init__(self, stream=None, interval: float = 5.0):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._last: dict[str, float] = {}
        self._desc: dict[str, str] = {}
        self._total: dict[str, float | None] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, key, description, total):
        self._desc[key], self._total[key], self._last[key] = description, total, time.monotonic()
        self._print(f"[start] {description}")

    def update(self, key, completed, **info):
        if "total" in info:
            self._total[key] = info.pop("total")
        now = time.monotonic()
        if now - self._last.get(key, 0.0) >= self.interval:
            self._last[key] = now
            total = self._total.get(key)
            frac = f"{completed:.1f}/{total:.1f}" if total else f"{completed:.1f}"
            self._print(f"[progress] {self._desc.get(key, key)} {frac} {_fmt(info)}".rstrip())

    def finish(self, key, **info):
        self._print(f"[done] {self._desc.get(key, key)} {_fmt(info)}".rstrip())

    def log(self, message):
        self._print(message)


class RichProgress:
    """rich progress bars on stderr; use as a context manager."""

    def __init__(self):
        self.console = Console(stderr=True)
        self._p = RichBars(TextColumn("{task.description}"), BarColumn(),
                           TextColumn("{task.completed:.1f}/{task.total:.1f}"), TextColumn("{task.fields[info]}"),
                           TimeRemainingColumn(), console=self.console, transient=False)
        self._tasks: dict[str, tp.Any] = {}
        self._totals: dict[str, float] = {}

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def start(self, key, description, total):
        self._totals[key] = total or 1.0
        self._tasks[key] = self._p.add_task(description, total=self._totals[key], info="")

    def update(self, key, completed, **info):
        if "total" in info:
            self._totals[key] = info.pop("total") or 1.0
            if key in self._tasks:
                self._p.update(self._tasks[key], total=self._totals[key])
        if key in self._tasks:
            self._p.update(self._tasks[key], completed=completed, info=_fmt(info))

    def finish(self, key, **info):
        if key in self._tasks:
            self._p.update(self._tasks[key], completed=self._totals[key], info=_fmt(info))

    def log(self, message):
        self._p.console.print(message, markup=False, highlight=False)


def make_progress(quiet: bool = False):
    """Rich on an interactive stderr, plain lines otherwise; a context manager either way.

    Args:
        quiet: no display at all (e.g. --json).
    """
    if quiet:
        return contextlib.nullcontext(NullProgress())
    if sys.stderr.isatty():
        return RichProgress()
    return contextlib.nullcontext(PlainProgress())
