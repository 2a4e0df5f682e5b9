"""Tensor ops and wall time of one fast-weight call, learning vs frozen (rate 0), on the `bench` preset (CPU).

What a batch-1 `LMGen.step` pays per variant call at d = 512 is mostly its op count, so this prints both:
the ops of one call (torch.profiler's top-level ops, completion steps included pro rata) and the median wall
time of a call without the profiler. The `mlp` variant: its TTT block on layer 2 (one token); `linear-adapter`:
the adapted `gating.linear_out` of layer 2 (the base linear included, the same on both sides). A development
tool for comparing commits (run it from each checkout); `ttt bench` gives the figures.

    .venv/bin/python scripts/learner_ops.py mlp linear-adapter
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
from torch.profiler import profile

from ttt_cli import load_model
from ttt_cli.fastweights.attach import ttt_layers


def call_of(variant: str, lm) -> tuple:
    """The module to time and its one-token input."""
    if variant == "mlp":
        return ttt_layers(lm)[2], torch.randn(1, 1, lm.dim)
    mod = lm.transformer.layers[2].gating.linear_out
    return mod, torch.randn(1, 1, mod.in_features)


def measure(variant: str, rate: float | None, chunks: int = 4) -> tuple[float, float]:
    """(ops per call, median µs per call) over whole chunks of one-token calls."""
    ttt = {"variant": variant} if rate is None else {"variant": variant, "lr": rate}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        m = load_model("bench", device="cpu", dtype="fp32", ttt=ttt)
    mod, x = call_of(variant, m.lm)
    C = ttt_layers(m.lm)[2].chunk_size
    with torch.no_grad(), m.lm.streaming(1):
        for _ in range(2 * C):
            mod(x)
        with profile() as pr:
            for _ in range(C):
                mod(x)
        ops = sum(1 for e in pr.events() if e.cpu_parent is None) / C
        times = []
        for _ in range(chunks * 8):
            t = time.perf_counter()
            for _ in range(C):
                mod(x)
            times.append((time.perf_counter() - t) / C * 1e6)
    return ops, statistics.median(times)


def main(variants: list[str]) -> None:
    torch.set_num_threads(2)
    for v in variants:
        on_ops, on_us = measure(v, None)
        off_ops, off_us = measure(v, 0.0)
        print(f"{v}: learning {on_ops:.1f} ops {on_us:.0f} us, frozen {off_ops:.1f} ops {off_us:.0f} us, "
              f"difference {on_us - off_us:.0f} us a call")


if __name__ == "__main__":
    main(sys.argv[1:] or ["mlp", "linear-adapter"])
