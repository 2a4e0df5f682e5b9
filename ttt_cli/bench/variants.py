"""Per-variant `ttt bench` figures: LMGen step overhead, a layer alone vs the plain layer, memory per stream."""

from __future__ import annotations

import dataclasses
import typing as tp

import torch

from ..fastweights.attach import ttt_layers
from ..fastweights.interface import FastWeightLayer
from ..models.loader import TTTModel
from ..telemetry import recording
from .options import GROUPS, PER_VARIANT, SUFFIXES, BenchOptions, load_measured, require_ttt
from .results import Figure
from .timing import alternating_medians, memory_bandwidth, refill_overhead, step_overhead

LAYER_T = 4096  # SPEC §8.5: a layer's forward on T = 4096 tokens


def variant_figures(opts: BenchOptions, variant: str, wanted: list[str], progress
                    ) -> tuple[dict[str, Figure], TTTModel]:
    """Step overhead (b1, b8, floor, p99), layer ratio and memory per stream of one variant on `opts.model`.

    TTT off: the same model with its fast weights frozen (rate 0, SPEC §5.5; In-Place's frozen layer is
    moshi's gating kernel on W0), so every variant's overhead is the price of learning.

    Args:
        opts: the run's options.
        variant: the fast-weight variant attached to the model's base.
        wanted: every figure name the run measures (this variant's carry its suffix).
        progress: a `Progress` hook (ttt_cli.progress).

    Returns:
        The figures (suffixed names) and the TTT-on model.
    """
    sfx = SUFFIXES[variant]
    want = {n for n in PER_VARIANT if n + sfx in wanted}
    on = load_measured(opts, {"variant": variant})
    require_ttt(on)
    layers = ttt_layers(on.lm)
    out: dict[str, Figure] = {}
    if want & set(GROUPS["step"]):
        for name, f in step_figures(on, opts, want, variant, progress).items():
            f.name = name + sfx
            f.detail["variant"] = variant
            out[f.name] = f
    if "ttt_layer_ratio" in want:
        progress.start(f"layer{sfx}", f"{variant}: TTT layer vs plain layer, T={LAYER_T}", None)
        first_i, first = next(iter(layers.items()))
        lr = layer_ratio(first, on.device, reps=opts.sizes.layer_reps)
        progress.finish(f"layer{sfx}", ratio=lr["ratio"])
        out["ttt_layer_ratio" + sfx] = Figure("ttt_layer_ratio" + sfx, lr["ratio"],
                                              detail={"variant": variant, "layer": first_i, **lr})
    if "memory_per_stream_error" in want:
        predicted = sum(l.state_bytes_per_stream() for l in layers.values())
        measured = sum(measured_bytes_per_stream(l) for l in layers.values())
        err = abs(measured - predicted) / max(predicted, 1)
        out["memory_per_stream_error" + sfx] = Figure("memory_per_stream_error" + sfx, err, detail={
            "variant": variant, "predicted_bytes": predicted, "measured_bytes": measured,
            "formula": " + ".join(l.memory_formula() for l in layers.values()),
            "measured_as": "bytes of the per-stream state tensors (B=2 minus B=1)"})
    return out, on


def step_figures(on: TTTModel, opts: BenchOptions, want: set[str], variant: str, progress) -> dict[str, Figure]:
    """LMGen.step TTT on / off at batch 1 and/or 8, and the batch-8 memory floor (unsuffixed names).

    Args:
        on: the model with `variant` attached, TTT on.
        opts: the run's options.
        want: the unsuffixed per-variant names wanted.
        variant: the variant (TTT off = the same variant at rate 0).
        progress: a `Progress` hook.
    """
    off = load_measured(opts, {"variant": variant, "lr": 0.0})
    dev = on.device
    b8 = bool({"step_overhead_b8", "step_overhead_b8_floor"} & want)
    sizes = [B for B, w in ((1, bool({"step_overhead_b1", "step_ms_p99_b1"} & want)), (8, b8)) if w]
    out: dict[str, Figure] = {}
    stats_b: dict[int, dict] = {}
    for B in sizes:
        key = f"step{B}{SUFFIXES[variant]}"
        progress.start(key, f"{variant}: LMGen.step TTT on/off, batch {B}", None)
        stats, _ = step_overhead(on, off, B, opts.lmgen_steps, dev, opts.seed)
        stats_b[B] = stats
        progress.finish(key, ratio=stats["paired_ratio"])
        out[f"step_overhead_b{B}"] = Figure(f"step_overhead_b{B}", stats["paired_ratio"], detail=_paired_detail(stats))
    if 1 in stats_b:
        st = stats_b[1]["on"]
        out["step_ms_p99_b1"] = Figure("step_ms_p99_b1", st["p99_ms"], detail={"median_ms": st["median_ms"],
                                                                               "max_ms": st["max_ms"]})
    if b8:  # batch-8 memory floor: reading 8 streams' fp32 fast state each step, at the measured bandwidth
        bw = memory_bandwidth(dev)
        extra = sum(8 * l.bytes_read_per_step() for l in ttt_layers(on.lm).values())
        floor = 1 + (extra / bw) / (stats_b[8]["off"]["median_ms"] / 1e3)
        out["step_overhead_b8_floor"] = Figure("step_overhead_b8_floor", floor, detail={
            "extra_bytes_per_step": extra, "bandwidth_gb_s": bw / 1e9})
        out["step_overhead_b8"].detail["floor"] = floor
    del off
    return {k: v for k, v in out.items() if k in want or k == "step_overhead_b8_floor" and b8}


def telemetry_figures(own: TTTModel, opts: BenchOptions, progress) -> dict[str, Figure]:
    """LMGen.step of the model with the update series recorded / not recorded, batch 1, interleaved (SPEC §5.5).

    Args:
        own: the model as loaded (its variant is the one measured).
        opts: the run's options.
        progress: a `Progress` hook.
    """
    rec = load_measured(opts, {"variant": own.ttt.variant})
    progress.start("telemetry", f"{own.ttt.variant}: LMGen.step with / without --telemetry, batch 1", None)
    with recording(rec.lm):
        stats, _ = step_overhead(rec, own, 1, opts.lmgen_steps, own.device, opts.seed)
    progress.finish("telemetry", ratio=stats["paired_ratio"])
    del rec
    return {"telemetry_overhead_b1": Figure("telemetry_overhead_b1", stats["paired_ratio"], detail={
        "variant": own.ttt.variant, **_paired_detail(stats, "with_telemetry", "without")})}


def _paired_detail(stats: dict, on: str = "on", off: str = "off") -> dict:
    """A step figure's detail: both sides' step statistics (under the names `on`, `off`), how the value is taken,
    and the ratio of the medians."""
    return {on: stats["on"], off: stats["off"], "median_ratio": stats["on"]["median_ms"] / stats["off"]["median_ms"],
            "value_is": "median over rounds of on / off step time, the two stepping alternately (one step each a round)"}


def refill_figures(own: TTTModel, opts: BenchOptions, progress) -> dict[str, Figure]:
    """Batch-8 TTT on / off, mean step times over whole chunks, streams in phase and refilled (SPEC §8.9).

    Args:
        own: the model as loaded (its variant is the one measured; two more copies are loaded, one TTT off).
        opts: the run's options.
        progress: a `Progress` hook.
    """
    v = own.ttt.variant
    C = min(opts.sizes.refill_chunk or own.ttt.chunk_size, own.ttt.chunk_size)
    rechunk = {} if C == own.ttt.chunk_size else {"chunk_size": C}
    staggered = load_measured(opts, {"variant": v, **rechunk}) if rechunk else own
    in_phase = load_measured(opts, {"variant": v, **rechunk})
    off = load_measured(opts, {"variant": v, "lr": 0.0, **rechunk})
    progress.start("refill", f"{v}: LMGen.step batch 8, streams refilled at staggered steps / in phase", None)
    st = refill_overhead(staggered, in_phase, off, 8, C, opts.sizes.refill_rounds, own.device, opts.seed)
    del staggered, in_phase, off
    mean = {k: st[k]["mean_ms"] / st["off"]["mean_ms"] for k in ("staggered", "in_phase")}
    progress.finish("refill", ratio=mean["staggered"])
    detail = {"variant": v, "chunk_size": C, "staggered": st["staggered"], "in_phase": st["in_phase"],
              "off": st["off"], "slot_restart_steps": st["starts"]}
    return {"step_overhead_b8_mean": Figure("step_overhead_b8_mean", mean["in_phase"], detail=detail),
            "step_overhead_b8_refill": Figure("step_overhead_b8_refill", mean["staggered"], detail=detail)}


def layer_ratio(layer: FastWeightLayer, device: str, T: int = LAYER_T, reps: int = 5) -> dict:
    """A fast-weight layer's forward on T tokens vs the plain module it extends (SPEC §8.5), with its FLOP floor.

    The layer says what runs and what it costs (`forwards_vs_plain`, `macs_vs_plain`); the inputs' seed and
    the timing are the bench's.

    Args:
        layer: the layer measured (its model's device).
        device: where it runs (for synchronisation).
        T: tokens of the forward.
        reps: timed rounds (after one warm-up), the two forwards alternating.
    """
    ttt, plain, compared = layer.forwards_vs_plain(T, torch.Generator().manual_seed(0))
    flop_floor, formula = layer.macs_vs_plain(T)
    t_ttt, t_plain = alternating_medians((ttt, plain), device, reps)
    return {"ttt_ms": 1e3 * t_ttt, "plain_ms": 1e3 * t_plain, "ratio": t_ttt / t_plain, "flop_floor": flop_floor,
            "flop_floor_formula": formula, "compared": compared, "T": T, "reps": reps}


def _tensor_bytes(obj: tp.Any, seen: set[int]) -> int:
    """Bytes of the distinct tensors reachable from a streaming state (dataclass fields, dicts, lists)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def measured_bytes_per_stream(layer: FastWeightLayer) -> int:
    """Bytes one more stream adds to a layer's streaming state (B = 2 minus B = 1: shared tensors cancel).

    Through moshi's public streaming API: the states the layer (and any streaming sub-module) holds now are
    set aside, fresh ones entered at B = 1 and B = 2 and measured, and the old ones put back.

    Args:
        layer: the fast-weight layer, streaming or not.
    """
    aside = layer.get_streaming_state()  # {module name: state or None}; "" is the layer itself
    layer.set_streaming_state({name: None for name in aside})
    sizes = []
    try:
        for B in (1, 2):
            with layer.streaming(B):
                sizes.append(_tensor_bytes(layer.get_streaming_state(), set()))
    finally:
        layer.set_streaming_state(aside)
    return sizes[1] - sizes[0]
