"""Batch-1 `LMGen.step` of two copies of the `bench` preset, interleaved in blocks of steps, TTT on / off or A/A.

`step_overhead_b1*` compares two model copies loaded one after the other; this runs that comparison on any two
copies, so that two identical frozen copies (`off off`) show what the figure reads when TTT costs nothing: the
noise floor of the comparison on this machine. By default the first copy steps first in every round (to show an
order effect); `--rotate` alternates, and `--interleave` re-allocates both copies' tensors in alternation first.
It prints the ratio of the medians and the median of the blocks' paired ratios. `ttt bench`'s protocol
(`ttt_cli.bench.timing.step_overhead`) is `--steps 1 --rounds 1024 --rotate --interleave`, its value the paired
one. A development tool; `ttt bench` gives the figures.

    .venv/bin/python scripts/step_ab.py linear-adapter off off     # A/A: both frozen (rate 0)
    .venv/bin/python scripts/step_ab.py linear-adapter on off      # what step_overhead_b1_adapter measures
    .venv/bin/python scripts/step_ab.py mlp off off --second-first # the copy loaded second stepped first
    .venv/bin/python scripts/step_ab.py mlp off off --rotate --interleave   # ttt bench's protocol
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from moshi.utils.compile import no_cuda_graph

from ttt_cli import load_model
from ttt_cli.bench.timing import interleave_storage, rotated
from ttt_cli.fastweights.graphs import TTTLMGen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["inplace", "mlp", "linear-adapter"])
    ap.add_argument("first", choices=["on", "off"], help="the copy loaded first: TTT on or frozen (rate 0)")
    ap.add_argument("second", choices=["on", "off"], help="the copy loaded second")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved blocks per copy")
    ap.add_argument("--steps", type=int, default=32, help="timed steps per block")
    ap.add_argument("--second-first", action="store_true", help="step the second copy first in each round")
    ap.add_argument("--rotate", action="store_true", help="alternate which copy steps first (ttt bench's order)")
    ap.add_argument("--interleave", action="store_true",
                    help="re-allocate the copies' tensors in alternation first (ttt bench's interleave_storage)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        models = [load_model("bench", device="cpu", dtype="fp32",
                             ttt={"variant": a.variant, **({} if r == "on" else {"lr": 0.0})})
                  for r in (a.first, a.second)]
    if a.interleave:
        interleave_storage(*models)
    gens = [TTTLMGen(m.lm, use_sampling=False) for m in models]
    lm = models[0].lm
    g = torch.Generator().manual_seed(0)
    times: list[list[float]] = [[], []]
    blocks: list[list[float]] = [[], []]  # each block's median
    order = [1, 0] if a.second_first else [0, 1]
    with torch.no_grad(), no_cuda_graph(), gens[0].streaming(1), gens[1].streaming(1):
        for gen in gens:  # warm-up
            for _ in range(8):
                gen.step(torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q, 1), generator=g))
        for r in range(a.rounds):
            for i in (rotated(order, r) if a.rotate else order):
                block = []
                for _ in range(a.steps):
                    x = torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q, 1), generator=g)
                    t = time.perf_counter()
                    gens[i].step(x)
                    block.append(time.perf_counter() - t)
                times[i] += block
                blocks[i].append(statistics.median(block))
    m1, m2 = (1e3 * statistics.median(t) for t in times)
    paired = statistics.median(x / y for x, y in zip(*blocks))
    print(f"{a.variant}: first-loaded ({a.first}) {m1:.2f} ms, second-loaded ({a.second}) {m2:.2f} ms, "
          f"ratio {m1 / m2:.3f}, paired {paired:.3f}")


if __name__ == "__main__":
    main()
