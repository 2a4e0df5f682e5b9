"""The one registry of `ttt bench` figures (SPEC §8, §5.5): name, target, direction, unit, meaning."""

# `ttt bench` measures values; whether a figure met its target, and the exit code, come from here.
# Adding a figure is one `FigureSpec(...)` line in `FIGURES`. A variant's figures carry its name as a
# suffix (`ttt_layer_ratio_mlp`, `step_overhead_b1_adapter`) and share the base figure's entry.

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass

from ..errors import ConfigError

DIRECTIONS = ("<=", ">=")
VARIANT_SUFFIXES = ("mlp", "adapter")


@dataclass(frozen=True)
class FigureSpec:
    """One bench figure.

    Args:
        name: the figure's name in the table and JSON.
        target: the value to meet, or None for a figure reported for context only.
        direction: "<=" (lower is better) or ">=" (higher is better).
        unit: "x" (a ratio), "ms", "s", "nats", "bytes", ...
        meaning: one line saying what is measured.
        floor: name of another figure; a value within `floor_slack` of that figure's value also meets
            the target (SPEC §8.1: a memory-bound batch-8 step).
        floor_slack: the factor applied to `floor`.
        relative_to: name of another figure of the same run; the target is then a factor of that figure's
            value (SPEC §8.9: the refilled batch within 5% of the batch in phase).
    """

    name: str
    target: float | None
    direction: str
    unit: str
    meaning: str
    floor: str | None = None
    floor_slack: float = 1.10
    relative_to: str | None = None


FIGURES: dict[str, FigureSpec] = {f.name: f for f in (
    # SPEC §8 (CPU and GPU)
    FigureSpec("step_overhead_b1", 1.10, "<=", "x", "LMGen.step (depformer included) TTT on / off, batch 1, medians"),
    FigureSpec("step_overhead_b8", 1.15, "<=", "x", "LMGen.step TTT on / off, batch 8, medians (or within 10% "
               "of its memory floor)", floor="step_overhead_b8_floor"),
    FigureSpec("step_overhead_b8_floor", None, "<=", "x", "1 + time to read 8 streams' fp32 fast weights at the "
               "measured bandwidth / batch-8 step time"),
    FigureSpec("step_overhead_b8_mean", None, "<=", "x", "LMGen.step TTT on / off, batch 8 in phase, mean step "
               "times over whole chunks (the chunk updates amortised: a median skips them)"),
    FigureSpec("step_overhead_b8_refill", 1.05, "<=", "x", "as step_overhead_b8_mean with the 8 streams started at "
               "staggered steps (refilled slots: chunks complete on 8 different steps); target: a factor of "
               "step_overhead_b8_mean (SPEC §8.9)", relative_to="step_overhead_b8_mean"),
    FigureSpec("step_ms_p99_b1", None, "<=", "ms", "p99 of the TTT-on batch-1 step (chunk completions spike)"),
    FigureSpec("ttt_layer_ratio", 2.0, "<=", "x", "one TTT layer forward on T = 4096 tokens / moshi's gating"),
    FigureSpec("memory_per_stream_error", 0.10, "<=", "x", "|bytes one more stream adds to the fast-weight state "
               "(B=2 minus B=1) - the layer's memory estimate| / estimate"),
    FigureSpec("eval_block_speedup", 10.0, ">=", "x", "eval scoring tokens/s, blocks of 250 / one step per call"),
    FigureSpec("eval_nll_max_abs_diff", 1e-4, "<=", "nats", "max |NLL| difference, block vs step-by-step scoring"),
    FigureSpec("eval_memory_ratio", 1.10, "<=", "x", "peak RSS of ttt eval, 30-min / 5-min document (own processes)"),
    FigureSpec("eval_cache_encode_seconds", 0.5, "<=", "s", "encoding time of a second ttt eval on cached codes "
               "(a cache hit required)"),
    # SPEC §5.1, §5.5, §8.6-8.8: named by the SPEC, measured once their commands exist
    FigureSpec("infer_memory_ratio", 1.10, "<=", "x", "peak RSS of ttt infer, 60-min / 5-min file, tiny model"),
    FigureSpec("telemetry_overhead_b1", 1.02, "<=", "x", "LMGen.step with --telemetry (update series recorded) / "
               "without, batch 1, medians (issue 15's target; the SPEC names the figure only)"),
    FigureSpec("scaleout_speedup_2", None, ">=", "x", "ttt eval tokens/s, 2 torchrun processes / 1 (CPU, gloo; "
               "launch and load included); parallel efficiency = value / 2"),
    FigureSpec("scaleout_steady_speedup_2", 1.8, ">=", "x", "ttt eval tokens/s in the steady state (first rank "
               "starting to score to the last one done, as the ranks record it), 2 torchrun processes / 1 (SPEC §8.10)"),
    FigureSpec("scaleout_fixed_s_per_rank", None, "<=", "s", "seconds of the 2-process job outside its steady state "
               "(launch, imports, model load, setup, merge, writing, exit): what every rank pays once"),
    FigureSpec("gpu_rtf_b1", None, ">=", "x", "audio seconds per wall second, TTT on, bf16, batch 1, graphed"),
    FigureSpec("gpu_rtf_b8", None, ">=", "x", "audio seconds per wall second per stream, TTT on, bf16, batch 8"),
    FigureSpec("gpu_rtf_ratio_b1", None, ">=", "x", "real-time factor TTT on / plain moshi LMGen, batch 1"),
    FigureSpec("gpu_rtf_ratio_b8", None, ">=", "x", "real-time factor TTT on / plain moshi LMGen, batch 8"),
    FigureSpec("gpu_memory_per_stream_error", 0.10, "<=", "x", "|measured - estimated| / estimated fast-weight "
               "bytes per added stream"),
)}


def spec(name: str) -> FigureSpec:
    """The registry entry of `name`, including variant-suffixed names; ConfigError if unknown."""
    if name in FIGURES:
        return FIGURES[name]
    base, _, suffix = name.rpartition("_")
    if suffix in VARIANT_SUFFIXES and base in FIGURES:
        b = FIGURES[base]
        return FigureSpec(name, b.target, b.direction, b.unit, f"{b.meaning} ({suffix} variant)", b.floor and
                          f"{b.floor}_{suffix}", b.floor_slack, b.relative_to and f"{b.relative_to}_{suffix}")
    raise ConfigError(f"unknown bench figure {name!r}. Known figures: {', '.join(FIGURES)} (and variant suffixes "
                      f"{', '.join('_' + s for s in VARIANT_SUFFIXES)}).")


def parse_targets(items: tp.Iterable[str]) -> dict[str, float]:
    """`NAME=VALUE` strings (the `--target` option) -> {name: target}, each name checked against the registry."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not sep or not math.isfinite(v):
            raise ConfigError(f"--target {item!r}: expected NAME=NUMBER, e.g. step_overhead_b1=1.05.")
        spec(name.strip())
        out[name.strip()] = v
    return out


def judge(name: str, value: float, measured: dict[str, float], targets: dict[str, float] | None = None
          ) -> tuple[float | None, bool | None]:
    """(target, met) of one measured figure: None, None without a target. A target relative to another
    figure is that figure's value times the registry's (or `targets`') factor.

    Args:
        name: the figure.
        value: its measured value (NaN = the measurement failed: a missed target).
        measured: every value of the run (for `floor` figures).
        targets: overrides of registry targets (`--target`).
    """
    s = spec(name)
    target = (targets or {}).get(name, s.target)
    if target is None:
        return None, None
    if s.relative_to is not None:
        target *= measured.get(s.relative_to, math.nan)
    ok = value <= target if s.direction == "<=" else value >= target
    if not ok and s.floor is not None and s.floor in measured:
        ok = value <= s.floor_slack * measured[s.floor]
    return target, bool(ok) and math.isfinite(value)
