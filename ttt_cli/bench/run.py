"""`ttt bench`'s driver: the figures selected, each variant then the model's own figures measured, all judged."""

from __future__ import annotations

import datetime as _dt
import time

import torch

from ..errors import ConfigError
from ..models.loader import TTTModel, load_model
from ..progress import NullProgress
from .gpu import SKIP_NOTE, gpu_figures
from .options import GPU_FIGURES, GROUPS, SUFFIXES, VARIANT_GROUPS, BenchOptions, require_ttt, selected, \
    variant_names, variant_order
from .processes import eval_run_figures, infer_memory_figures
from .results import BenchResult, Figure, device_name, judged, versions
from .scaleout import scaleout_figures
from .scoring import score_figures
from .variants import refill_figures, telemetry_figures, variant_figures


def run_bench(opts: BenchOptions, progress=None) -> BenchResult:
    """Measures the selected §8 figures on one device and judges them against the registry's targets.

    Every variant asked for is attached to the same base model and measured in turn with its suffix
    (SPEC §5.5); the eval figures are the model's own (as loaded, first variant measured).

    Args:
        opts: model, device, dtype, quick mode, steps, figure and variant selection, target overrides.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    progress = progress or NullProgress()
    wanted, gpu, variants = _plan(opts)
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    values: dict[str, Figure] = {}
    own = None  # the model the eval figures and the provenance are taken from: the first variant's
    for v in variants + [v for v in SUFFIXES if v not in variants]:
        if set(variant_names(v)) & set(wanted):
            vf, on = variant_figures(opts, v, wanted, progress)
            values.update(vf)
            own = own or on
            del on
    if own is None:
        own = load_model(opts.model, device=opts.device, dtype=opts.dtype)
        require_ttt(own)
    values.update(_model_figures(own, opts, wanted, progress))
    notes = []
    if gpu and torch.device(own.device).type == "cuda":
        values.update(gpu_figures(own, opts, gpu, progress))
        wanted += gpu
    elif gpu:
        notes.append(SKIP_NOTE.format(names=", ".join(gpu), device=opts.device))
    return BenchResult(device_name(own.device), versions(), own.model_id, own.config.get("ttt") or {},
                       judged(wanted, values, opts.targets),
                       _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       time.perf_counter() - t_start, notes)


def _plan(opts: BenchOptions) -> tuple[list[str], list[str], list[str]]:
    """(CPU figures, GPU figures, variants) of a run, in run order; ConfigError for options that cannot run."""
    if opts.steps is not None and opts.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {opts.steps}.")
    variants = variant_order(opts)
    wanted = selected(opts.only, variants)
    gpu = [n for n in wanted if n in GPU_FIGURES] if opts.only else list(GPU_FIGURES)
    wanted = [n for n in wanted if n not in GPU_FIGURES]
    for name in opts.targets:
        if name not in wanted + gpu:
            raise ConfigError(f"--target {name}: that figure is not measured in this run.")
    return wanted, gpu, variants


def _model_figures(own: TTTModel, opts: BenchOptions, wanted: list[str], progress) -> dict[str, Figure]:
    """The model's own figures among `wanted` (eval scoring, eval and infer processes, scale-out, telemetry,
    refilled batches)."""
    need = {g for g, names in GROUPS.items() if g not in VARIANT_GROUPS and set(names) & set(wanted)}
    values: dict[str, Figure] = {}
    if "score" in need:
        values.update(score_figures(own, opts, progress))
    if need & {"memory", "cache"}:
        values.update(eval_run_figures(own, opts, "memory" in need, "cache" in need, progress))
    if "infer_memory" in need:
        values.update(infer_memory_figures(own, opts, progress))
    if "scaleout" in need:
        values.update(scaleout_figures(own, opts, set(GROUPS["scaleout"]) & set(wanted), progress))
    if "telemetry" in need:
        values.update(telemetry_figures(own, opts, progress))
    if "refill" in need:
        values.update(refill_figures(own, opts, progress))
    return values
