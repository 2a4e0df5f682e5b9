"""What a `ttt bench` run gives: measured figures, judged against the registry, and the run's provenance."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

import moshi
import torch

from .. import __version__
from .registry import judge, spec


@dataclass
class Figure:
    """One measured figure; `target` and `passed` come from the registry (`ttt_cli.bench.registry`)."""

    name: str
    value: float
    target: float | None = None
    passed: bool | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None  # a measurement whose precondition failed: counts as a missed target


@dataclass
class BenchResult:
    """A run's judged figures in run order, with the device, versions, model and TTT config they were measured on."""

    device: str
    versions: dict
    model: str
    config: dict
    figures: list[Figure]
    date: str
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. GPU figures skipped without CUDA

    @property
    def missed(self) -> list[Figure]:
        """Figures whose target was not met."""
        return [f for f in self.figures if f.passed is False]

    @property
    def exit_code(self) -> int:
        """SPEC §5.5: 0 when every target is met, 1 when one is missed."""
        return 1 if self.missed else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["figures"] = [{"name": f.name, "value": f.value, "target": f.target, "pass": f.passed,
                         "direction": spec(f.name).direction, "unit": spec(f.name).unit,
                         **({"error": f.error} if f.error else {}), **f.detail} for f in self.figures]
        d["exit_code"] = self.exit_code
        return d


def judged(names: list[str], values: dict[str, Figure], targets: dict[str, float]) -> list[Figure]:
    """The figures `names` of `values`, each with its target and whether it met it (a failed measurement misses).

    Args:
        names: the figures of the run, in order.
        values: every measured figure by name.
        targets: overrides of registry targets (`--target`).
    """
    measured = {n: f.value for n, f in values.items()}
    figs = []
    for name in names:
        f = values[name]
        f.target, f.passed = judge(name, f.value, measured, targets)
        if f.error and f.passed is not None:
            f.passed = False
        figs.append(f)
    return figs


def versions() -> dict:
    """The versions a run's figures depend on: ttt, moshi, torch, Python, and torch's thread count."""
    return {"ttt": __version__, "moshi": getattr(moshi, "__version__", "?"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def device_name(device: str) -> str:
    """The device in words: the CUDA device's name, or the CPU's kind and core count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
