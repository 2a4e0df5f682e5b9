"""`ttt bench` on a GPU (SPEC §5.5, §8.6-8.8): real-time factors with and without CUDA graphs, memory per stream."""

from __future__ import annotations

import typing as tp

import torch

from ..fastweights.attach import state_bytes_per_stream
from ..fastweights.graphs import TTTLMGen
from ..models.loader import TTTModel
from ..units import FRAME_RATE
from .options import BenchOptions, load_measured
from .results import Figure
from .timing import step_overhead

FRAME_SECONDS = 1 / FRAME_RATE  # one LMGen step = one Mimi frame
SKIP_NOTE = "GPU figures ({names}) skipped: no CUDA device in this run (--device {device})."


def realtime_factor(step_ms: float) -> float:
    """Audio seconds per wall second of one stream: every step advances each stream by one 80 ms frame."""
    return FRAME_SECONDS / (step_ms / 1e3)


def per_stream_growth(peak_b1: int, peak_b2: int) -> int:
    """Bytes one more stream adds to a run's peak memory (B = 2 minus B = 1)."""
    return peak_b2 - peak_b1


def memory_error(ttt: tuple[int, int], plain: tuple[int, int], estimate: int) -> tuple[float, int]:
    """(|measured − estimate| / estimate, measured): the fast-weight bytes per added stream measured as the
    TTT model's per-stream growth of `max_memory_allocated` minus plain moshi's (attention caches, activations).

    Args:
        ttt, plain: peak bytes at B = 1 and B = 2 of the TTT model and of plain moshi.
        estimate: SPEC §5's per-stream estimate (Σ over TTT layers of `state_bytes_per_stream`).
    """
    measured = per_stream_growth(*ttt) - per_stream_growth(*plain)
    return abs(measured - estimate) / estimate, measured


def _peak_bytes(lm, B: int, steps: int, device: str) -> int:
    """`torch.cuda.max_memory_allocated` growth over a B-stream generation of `steps` steps (TTTLMGen)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    gen = TTTLMGen(lm, use_sampling=False)
    x = torch.zeros(B, lm.n_q - lm.dep_q, 1, dtype=torch.long, device=device)  # [B, K_in, 1]
    with torch.no_grad(), gen.streaming(B):
        for _ in range(steps):
            gen.step(x)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return peak - base


def gpu_figures(on: TTTModel, opts: BenchOptions, names: tp.Sequence[str], progress) -> dict[str, Figure]:
    """The GPU figures of `names` for model `on` (TTT on, loaded on CUDA): real-time factor at batch 1 and 8 with
    CUDA graphs (TTTLMGen: one graph per step phase) vs plain moshi in the same run, the same without graphs
    (in each figure's detail), and the measured vs estimated fast-weight memory per stream.

    Args:
        on: the model as loaded, on CUDA.
        opts: the run's options.
        names: the GPU figures wanted.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    dev = str(on.device)
    plain = load_measured(opts, False)
    out: dict[str, Figure] = {}
    for B in (1, 8):
        if not {f"gpu_rtf_b{B}", f"gpu_rtf_ratio_b{B}"} & set(names):
            continue
        detail = {}
        for graphs in (True, False):
            key = f"gpu{B}{'g' if graphs else ''}"
            progress.start(key, f"GPU real-time factor, batch {B}, CUDA graphs {'on' if graphs else 'off'}", None)
            stats, _ = step_overhead(on, plain, B, opts.lmgen_steps, dev, opts.seed, cuda_graphs=graphs)
            rtf = {k: realtime_factor(stats[k]["median_ms"]) for k in ("on", "off")}
            # the RTF ratio is the paired step ratio's inverse (a real-time factor is 1 / step time)
            detail["graphs" if graphs else "no_graphs"] = {"rtf_ttt": rtf["on"], "rtf_plain": rtf["off"],
                                                           "ratio": 1 / stats["paired_ratio"],
                                                           "step_ms": {k: stats[k] for k in ("on", "off")}}
            progress.finish(key, ratio=1 / stats["paired_ratio"])
        g = detail["graphs"]
        out[f"gpu_rtf_b{B}"] = Figure(f"gpu_rtf_b{B}", g["rtf_ttt"], detail=detail)
        out[f"gpu_rtf_ratio_b{B}"] = Figure(f"gpu_rtf_ratio_b{B}", g["ratio"], detail={
            "no_graphs_ratio": detail["no_graphs"]["ratio"], "rtf_plain": g["rtf_plain"]})
    if "gpu_memory_per_stream_error" in names:
        n = 8
        peaks = {name: (_peak_bytes(m.lm, 1, n, dev), _peak_bytes(m.lm, 2, n, dev)) for name, m in
                 (("ttt", on), ("plain", plain))}
        estimate = state_bytes_per_stream(on.lm)
        err, measured = memory_error(peaks["ttt"], peaks["plain"], estimate)
        out["gpu_memory_per_stream_error"] = Figure("gpu_memory_per_stream_error", err, detail={
            "measured_bytes": measured, "predicted_bytes": estimate})
    del plain
    return {k: v for k, v in out.items() if k in names}
