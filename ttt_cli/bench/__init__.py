"""`ttt bench` (SPEC §5.5, §8): the performance figures; this module re-exports the package's public names."""

from .options import MEASURED, BenchOptions
from .results import BenchResult, Figure
from .run import run_bench

__all__ = ["MEASURED", "BenchOptions", "BenchResult", "Figure", "run_bench"]
