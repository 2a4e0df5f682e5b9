"""What a `ttt bench` run measures: its options, the figure groups and the names a run selects."""

from __future__ import annotations

import typing as tp
import warnings
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models.config import resolve_ttt_config
from ..models.loader import TTTModel, load_model
from ..models.resolver import resolve
from .registry import spec

# Measurement groups: the figures each one produces (a run measures only the groups it needs).
# The first three are measured per fast-weight variant, their names carrying the variant's suffix.
GROUPS = {
    "step": ("step_overhead_b1", "step_overhead_b8", "step_overhead_b8_floor", "step_ms_p99_b1"),
    "layer": ("ttt_layer_ratio",),
    "state": ("memory_per_stream_error",),
    "score": ("eval_block_speedup", "eval_nll_max_abs_diff"),
    "memory": ("eval_memory_ratio",),
    "cache": ("eval_cache_encode_seconds",),
    "infer_memory": ("infer_memory_ratio",),
    "scaleout": ("scaleout_speedup_2", "scaleout_steady_speedup_2", "scaleout_fixed_s_per_rank"),
    "telemetry": ("telemetry_overhead_b1",),
    "refill": ("step_overhead_b8_mean", "step_overhead_b8_refill"),
}
VARIANT_GROUPS = ("step", "layer", "state")
# A variant's figure-name suffix (SPEC §5.5): In-Place's figures carry §8's names.
SUFFIXES = {"inplace": "", "mlp": "_mlp", "linear-adapter": "_adapter"}
PER_VARIANT = tuple(n for g in VARIANT_GROUPS for n in GROUPS[g])
# Measured on a CUDA device only (ttt_cli.bench.gpu); a run elsewhere notes them as skipped.
GPU_FIGURES = ("gpu_rtf_b1", "gpu_rtf_b8", "gpu_rtf_ratio_b1", "gpu_rtf_ratio_b8", "gpu_memory_per_stream_error")


@dataclass(frozen=True)
class Sizes:
    """How much each measurement runs: a figure measures the same thing at either size, --quick on less.

    Args:
        steps: LMGen steps per measurement (each variant and batch size, TTT on and off; telemetry).
        layer_reps: timed rounds of a layer's forward on T = 4096 tokens (after one warm-up round).
        score_steps: positions scored by block and by step-by-step scoring (a reset at a third).
        eval_seconds: eval_memory_ratio's long and short documents.
        infer_seconds: infer_memory_ratio's long and short files.
        infer_whole_file_seconds: `ttt infer --whole-file-seconds` of those runs: between the two lengths, so
            the long file is read in pieces and the short one whole (as moshi.run_inference reads it).
        scaleout_seconds: each of the scale-out jobs' 4 documents.
        scaleout_rounds: pairs of scale-out jobs (1 process, 2 processes); the best of each counts.
        refill_rounds: timed chunks of batch-8 steps per model of the refill figures.
        refill_chunk: the TTT layers' chunk size in the refill figures (None: the model's own).
    """

    steps: int
    layer_reps: int
    score_steps: int
    eval_seconds: tuple[float, float]
    infer_seconds: tuple[float, float]
    infer_whole_file_seconds: float
    scaleout_seconds: float
    scaleout_rounds: int
    refill_rounds: int
    refill_chunk: int | None


# Full: SPEC §8's sizes (a 30- vs 5-minute document, a 60- vs 5-minute file), steps over several chunks
# (chunk_size 256). --quick (SPEC §8.11, every figure in <= 3 minutes on 2 CPU cores): fewer steps than a
# chunk (the medians are of token steps either way: a chunk completes once in 256 steps) and shorter inputs
# in the same ratios (6:1 documents, 12:1 files); the refill figures time one chunk of 64 steps per batch
# instead of four of the model's 256 (the update then weighs 4× more per step: a stricter check, not a looser one).
FULL = Sizes(steps=1024, layer_reps=5, score_steps=1500, eval_seconds=(1800.0, 300.0), infer_seconds=(3600.0, 300.0),
             infer_whole_file_seconds=600.0, scaleout_seconds=120.0, scaleout_rounds=2, refill_rounds=4,
             refill_chunk=None)
QUICK = Sizes(steps=48, layer_reps=2, score_steps=250, eval_seconds=(30.0, 5.0), infer_seconds=(12.0, 1.0),
              infer_whole_file_seconds=6.0, scaleout_seconds=30.0, scaleout_rounds=1, refill_rounds=1,
              refill_chunk=64)


@dataclass
class BenchOptions:
    """What `ttt bench` measures.

    Args:
        model: model to measure (default the `bench` preset).
        device, dtype: as every command.
        quick: fewer steps and shorter inputs (`QUICK`'s sizes instead of `FULL`'s).
        steps: steps per measurement (LMGen steps per variant and batch size; positions scored by
            the eval figures); None = the sizes' `steps` / `score_steps`.
        seed: random seed of the synthetic inputs.
        only: figure names to measure (None = every figure `ttt bench` measures for `variants`).
        targets: overrides of registry targets ({name: target}, `--target NAME=VALUE`).
        variants: fast-weight variants to attach to the model's base and measure (None = all three,
            the model's own first); `only` may name any variant's figures instead.
    """

    model: str = "bench"
    device: str = "auto"
    dtype: str = "auto"
    quick: bool = False
    steps: int | None = None
    seed: int = 0
    only: list[str] | None = None
    targets: dict[str, float] = field(default_factory=dict)
    variants: list[str] | None = None

    @property
    def sizes(self) -> Sizes:
        """How much each measurement runs: `QUICK` with `quick`, else `FULL`."""
        return QUICK if self.quick else FULL

    @property
    def lmgen_steps(self) -> int:
        """LMGen steps per measurement: `steps`, else the sizes' (1024, or 48 with `quick`)."""
        return self.steps or self.sizes.steps

    @property
    def score_steps(self) -> int:
        """Positions scored by the block vs step-by-step figures: `steps`, else the sizes' (1500, or 250 quick)."""
        return self.steps or self.sizes.score_steps


def variant_names(variant: str) -> list[str]:
    """The per-variant figures of one variant, with its suffix."""
    return [n + SUFFIXES[variant] for n in PER_VARIANT]


def measured_names(variants: tp.Sequence[str] = tuple(SUFFIXES)) -> list[str]:
    """Every figure `ttt bench` measures for these variants, in run order (variants first, then eval)."""
    return [n for v in variants for n in variant_names(v)] + \
        [n for g, names in GROUPS.items() if g not in VARIANT_GROUPS for n in names]


MEASURED = tuple(measured_names())


def selected(only: list[str] | None, variants: list[str]) -> list[str]:
    """The figures to measure, in run order; ConfigError for names `ttt bench` cannot measure.

    Without `only`: every figure of `variants` and the eval figures. With it: exactly the names given
    (a variant's figures may be named whatever `variants` says).

    Args:
        only: `--only` values (names, comma-separated or repeated), or None.
        variants: the variants measured, in order (`variant_order`).
    """
    if not only:
        return measured_names(variants)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    for n in names:
        spec(n)  # unknown names: the registry's message
        if n not in MEASURED and n not in GPU_FIGURES:
            raise ConfigError(f"--only {n}: `ttt bench` does not measure this figure yet. It measures: "
                              f"{', '.join(MEASURED)}.")
    if not names:
        raise ConfigError("--only: give at least one figure name.")
    order = measured_names(variants + [v for v in SUFFIXES if v not in variants]) + list(GPU_FIGURES)
    return [n for n in order if n in names]


def variant_order(opts: BenchOptions) -> list[str]:
    """The variants to measure: `opts.variants`, or all of them with the model's own first.

    Args:
        opts: the run's options (`variants`, and `model` whose own variant goes first).
    """
    if opts.variants:
        unknown = [v for v in opts.variants if v not in SUFFIXES]
        if unknown:
            raise ConfigError(f"--variant {', '.join(unknown)}: choose among {', '.join(SUFFIXES)}.")
        return list(dict.fromkeys(opts.variants))
    res = resolve(opts.model)
    own, _ = resolve_ttt_config(res.config, int(res.config.get("num_layers", 32)))
    first = own.variant if own is not None else "inplace"
    return [first] + [v for v in SUFFIXES if v != first]


def load_measured(opts: BenchOptions, ttt: dict | bool) -> TTTModel:
    """`opts.model` on the run's device and dtype with `ttt` overrides (a variant, a rate; False: plain moshi).

    A variant the checkpoint has no tensors for warns that it takes its fresh init: expected here, silenced.

    Args:
        opts: the run's options (model, device, dtype).
        ttt: `load_model`'s `ttt` overrides.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt=ttt)


def require_ttt(m: TTTModel) -> None:
    """ConfigError when the model has no TTT layers: the bench has nothing to measure."""
    if not m.ttt or not m.ttt.layers:
        raise ConfigError(f"{m.model_id} has no TTT layers: nothing to measure (pass --ttt-layers to a base model).")
