"""Timing primitives of `ttt bench`: LMGen steps TTT on / off interleaved, alternating callables, a memory read."""

from __future__ import annotations

import contextlib
import statistics
import time
import typing as tp

import torch
from moshi.utils.compile import no_cuda_graph

from ..fastweights.graphs import TTTLMGen


def sync(device: str) -> None:
    """Waits for the device's queued work, so that a host clock measures it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def percentile(xs: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `xs`, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _gen_steps(gen, B: int, n: int, device: str, g: torch.Generator) -> list[float]:
    """Times `n` LMGen.step calls (depformer included) in the generator's current stream."""
    times = []
    for _ in range(n):
        x = torch.randint(0, gen.lm_model.card, (B, gen.lm_model.n_q - gen.lm_model.dep_q, 1), generator=g).to(device)
        sync(device)
        t = time.perf_counter()
        gen.step(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def step_overhead(on, off, B: int, steps: int, rounds: int, device: str, seed: int,
                  cuda_graphs: bool = False) -> tuple[dict, dict]:
    """Median step times of TTT on vs off, interleaved in `rounds` blocks that cross chunk boundaries.

    `on`/`off` are models (`.lm`); with `cuda_graphs` both run moshi's CUDA graphs (TTT on through
    `TTTLMGen`'s per-phase graphs), else both run eagerly.

    Args:
        on, off: the two models (`TTTModel`), stepped in turn on the same random codes.
        B: batch size (streams).
        steps: steps per model, split over `rounds` blocks (after 4 warm-up steps each).
        rounds: interleaved blocks.
        device: where the models run (for synchronisation).
        seed: seed of the random input codes.
        cuda_graphs: run both through CUDA graphs.

    Returns:
        ({"on"|"off": {"median_ms", "p99_ms", "max_ms", "steps"}}, {"on"|"off": step seconds}).
    """
    g = torch.Generator().manual_seed(seed)
    gens = {"on": TTTLMGen(on.lm, use_sampling=False), "off": TTTLMGen(off.lm, use_sampling=False)}
    times: dict[str, list[float]] = {"on": [], "off": []}
    per = max(1, steps // rounds)
    graphs = contextlib.nullcontext() if cuda_graphs else no_cuda_graph()
    with torch.no_grad(), graphs, gens["on"].streaming(B), gens["off"].streaming(B):
        for name in gens:  # warm-up
            _gen_steps(gens[name], B, 4, device, g)
        for _ in range(rounds):
            for name in ("on", "off"):
                times[name] += _gen_steps(gens[name], B, per, device, g)
    stats = {k: {"median_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * percentile(v, 0.99),
                 "max_ms": 1e3 * max(v), "steps": len(v)} for k, v in times.items()}
    return stats, times


def alternating_medians(fns: tp.Sequence[tp.Callable[[], tp.Any]], device: str, reps: int) -> list[float]:
    """Median seconds of each of `fns`, run in turn `reps` times after one warm-up round.

    Args:
        fns: the callables, timed one after the other within each round.
        device: where they run (for synchronisation).
        reps: timed rounds.
    """
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for r in range(reps + 1):
            for fn, acc in zip(fns, times):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                if r:  # first round is warm-up
                    acc.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def memory_bandwidth(device: str, mib: int = 256) -> float:
    """Bytes/s of a large read (sum over a buffer), the floor for reading per-stream fast weights.

    Args:
        device: where to read.
        mib: buffer size (MiB): large enough not to fit the caches.
    """
    x = torch.ones(mib * 2**20 // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best
