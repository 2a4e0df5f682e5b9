"""Timing primitives of `ttt bench`: LMGen steps TTT on / off interleaved, alternating callables, a memory read."""

from __future__ import annotations

import contextlib
import itertools
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


def rotated(items: tp.Sequence, r: int) -> list:
    """`items` in the order of round `r`: rotated by r, so that over the rounds each item goes first (and last)
    as often as the others (A B, B A, ... for two), and an order effect cancels (in A/A runs of two identical
    frozen copies of the bench model, scripts/step_ab.py, the copy stepped first read slower in 6 runs of 10:
    less than which copy was loaded first, see `interleave_storage`)."""
    k = r % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def interleave_storage(*models) -> None:
    """Re-allocates the models' parameters and buffers one tensor of each model in turn (same tensors, same
    values, new storage), so that copies loaded one after the other sit in alike memory.

    In A/A runs of two identical frozen copies of the bench model (scripts/step_ab.py) the copy loaded first
    read slower in 8 runs of 10 (by up to 7%); with their storage re-allocated this way (and the rounds rotated),
    0.983-1.035 in six runs, the first-loaded copy slower in three.

    Args:
        models: `TTTModel`s (their `.lm`).
    """
    tensors = [list(m.lm.parameters()) + list(m.lm.buffers()) for m in models]
    with torch.no_grad():
        for group in itertools.zip_longest(*tensors):
            for t in group:
                if t is not None:
                    t.data = t.data.clone()


def _gen_step(gen, B: int, device: str, g: torch.Generator) -> float:
    """Seconds of one LMGen.step call (depformer included) on random codes, in the generator's current stream."""
    x = torch.randint(0, gen.lm_model.card, (B, gen.lm_model.n_q - gen.lm_model.dep_q, 1), generator=g).to(device)
    sync(device)
    t = time.perf_counter()
    gen.step(x)
    sync(device)
    return time.perf_counter() - t


def step_overhead(on, off, B: int, steps: int, device: str, seed: int,
                  cuda_graphs: bool = False) -> tuple[dict, dict]:
    """Step times of TTT on vs off, the two alternating step by step, and the median of the paired ratios.

    Each model steps once per round, which goes first alternating from round to round (`rotated`), their storage
    re-allocated in alternation first (`interleave_storage`). Two consecutive steps (~60 ms apart at batch 1) see
    the machine alike, so a slowdown that lasts longer than that (another process on the two cores) cancels in
    their ratio: in A/A runs of two identical frozen copies of the bench model with two CPU-bound processes
    started and stopped at random (1-6 s) beside them, blocks of 256 (and 32) steps gave 0.92-1.35 (0.52-1.67)
    as the ratio of the medians, step-by-step alternation 0.985-1.009 and the median of the paired ratios
    0.999-1.001 (docs/design.md, "How the step figures are timed").

    `on`/`off` are models (`.lm`); with `cuda_graphs` both run moshi's CUDA graphs (TTT on through
    `TTTLMGen`'s per-phase graphs), else both run eagerly.

    Args:
        on, off: the two models (`TTTModel`), stepped in turn on the same random codes.
        B: batch size (streams).
        steps: steps per model (after 4 warm-up steps each), so chunk completions are among them.
        device: where the models run (for synchronisation).
        seed: seed of the random input codes.
        cuda_graphs: run both through CUDA graphs.

    Returns:
        ({"on"|"off": {"median_ms", "p99_ms", "max_ms", "steps"}, "paired_ratio": the median over rounds of
        on / off}, {"on"|"off": step seconds}).
    """
    interleave_storage(on, off)
    g = torch.Generator().manual_seed(seed)
    gens = {"on": TTTLMGen(on.lm, use_sampling=False), "off": TTTLMGen(off.lm, use_sampling=False)}
    times: dict[str, list[float]] = {"on": [], "off": []}
    graphs = contextlib.nullcontext() if cuda_graphs else no_cuda_graph()
    with torch.no_grad(), graphs, gens["on"].streaming(B), gens["off"].streaming(B):
        for name in gens:  # warm-up
            for _ in range(4):
                _gen_step(gens[name], B, device, g)
        for r in range(steps):
            for name in rotated(("on", "off"), r):
                times[name].append(_gen_step(gens[name], B, device, g))
    stats: dict = {k: {"median_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * percentile(v, 0.99),
                       "max_ms": 1e3 * max(v), "steps": len(v)} for k, v in times.items()}
    stats["paired_ratio"] = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
    return stats, times


def refill_overhead(staggered, in_phase, off, B: int, chunk: int, rounds: int, device: str, seed: int) -> dict:
    """Mean step times of TTT on with the B streams out of phase and in phase, and of TTT off (SPEC §8.9).

    The out-of-phase batch is made as `ttt infer --batch-size B` makes it on files of different lengths: slot
    k's stream ends and a new one starts (`LMGen.reset_streaming` of slot k) at warm-up step k·C/B, so each
    stream's chunk then completes on its own step. The three models step in turn, one step each per round (the
    first of them rotating, as `step_overhead`), for `rounds`·C rounds: any C consecutive steps of a model
    complete exactly one chunk of every stream, in phase or not, so the means compare the same learning, done by
    B updates of one stream or by one update of B streams.

    Args:
        staggered, in_phase, off: three models (`TTTModel`): two TTT-on copies and TTT off, stepped in turn
            on the same random codes.
        B: streams.
        chunk: the TTT layers' chunk size C.
        rounds: whole chunks of steps per model.
        device: where the models run.
        seed: seed of the random input codes.

    Returns:
        {"staggered"|"in_phase"|"off": {"mean_ms", "median_ms", "steps", "update_sets": the sets of streams
        updated together on a step}, "starts": the warm-up steps where a slot restarted}.
    """
    interleave_storage(*{id(m): m for m in (staggered, in_phase, off)}.values())
    g = torch.Generator().manual_seed(seed)
    models = {"staggered": staggered, "in_phase": in_phase, "off": off}
    gens = {k: TTTLMGen(m.lm, use_sampling=False) for k, m in models.items()}
    starts = {k * chunk // B: k for k in range(1, B)}  # warm-up step -> slot restarted there
    times: dict[str, list[float]] = {k: [] for k in gens}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(no_cuda_graph())
        for gen in gens.values():
            stack.enter_context(gen.streaming(B))
        for name, gen in gens.items():  # warm-up; the staggered batch's slots restarted in turn
            for t in range(max(starts, default=0) + 1 if name == "staggered" else 4):
                if name == "staggered" and t in starts:
                    gen.reset_streaming(torch.arange(B, device=device) == starts[t])
                _gen_step(gen, B, device, g)
        for r in range(rounds * chunk):
            for name in rotated(list(gens), r):
                times[name].append(_gen_step(gens[name], B, device, g))
        # what each batch's steps updated (the phases' keys: per host clock, the streams completing a chunk)
        updated = {k: sorted({s for key in gen.phase_graphs().calls for s in key if s}) for k, gen in gens.items()}
    out: dict = {k: {"mean_ms": 1e3 * statistics.fmean(v), "median_ms": 1e3 * statistics.median(v), "steps": len(v),
                     "update_sets": [list(s) for s in updated[k]]} for k, v in times.items()}
    out["starts"] = sorted(starts)
    return out


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
            for fn, acc in rotated(list(zip(fns, times)), r):
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
