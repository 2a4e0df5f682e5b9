"""Time spent inside the fast-weight blocks during batch-1 `LMGen.step`, TTT on vs off (`bench` preset, CPU).

`step_overhead_b1_*` compares whole steps of two model copies, so a run's figure also carries whatever the
machine did meanwhile. This times the variant's own calls inside the same interleaved steps (the `mlp` blocks,
or the adapted linears, base product included on both sides), so their on-off difference is what TTT costs
in the step without the rest of the step's noise. A development tool; `ttt bench` gives the figures.

    .venv/bin/python scripts/step_blocks.py mlp
    .venv/bin/python scripts/step_blocks.py linear-adapter
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch
from moshi.utils.compile import no_cuda_graph

from ttt_cli import load_model
from ttt_cli.bench.timing import interleave_storage, rotated
from ttt_cli.fastweights.attach import ttt_layers
from ttt_cli.fastweights.graphs import TTTLMGen

ROUNDS, STEPS = 16, 32


def timed_modules(variant: str, lm) -> list:
    """The modules whose calls are timed: the mlp blocks, or every adapted linear."""
    layers = ttt_layers(lm)
    if variant == "mlp":
        return list(layers.values())
    return [lm.transformer.layers[i].get_submodule(t) for i, layer in layers.items() for t in layer.targets]


def main(variant: str) -> None:
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        models = [load_model("bench", device="cpu", dtype="fp32",
                             ttt={"variant": variant, **({} if side == "on" else {"lr": 0.0})})
                  for side in ("on", "off")]
    interleave_storage(*models)
    inside = [0.0, 0.0]  # seconds inside the timed modules during the current step, per copy

    def timed(mod, i):
        forward = mod.forward

        def run(*args, **kwargs):
            t = time.perf_counter()
            out = forward(*args, **kwargs)
            inside[i] += time.perf_counter() - t
            return out
        mod.forward = run

    for i, m in enumerate(models):
        for mod in timed_modules(variant, m.lm):
            timed(mod, i)
    gens = [TTTLMGen(m.lm, use_sampling=False) for m in models]
    lm = models[0].lm
    g = torch.Generator().manual_seed(0)
    steps: list[list[float]] = [[], []]
    blocks: list[list[float]] = [[], []]
    with torch.no_grad(), no_cuda_graph(), gens[0].streaming(1), gens[1].streaming(1):
        for gen in gens:  # warm-up
            for _ in range(8):
                gen.step(torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q, 1), generator=g))
        for r in range(ROUNDS):
            for i in rotated([0, 1], r):
                for _ in range(STEPS):
                    x = torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q, 1), generator=g)
                    inside[i] = 0.0
                    t = time.perf_counter()
                    gens[i].step(x)
                    steps[i].append(time.perf_counter() - t)
                    blocks[i].append(inside[i])
    s = [1e3 * statistics.median(v) for v in steps]
    b = [1e3 * statistics.median(v) for v in blocks]
    print(f"{variant}: inside the blocks {b[0]:.2f} ms a step on, {b[1]:.2f} off, difference {b[0] - b[1]:.2f} ms "
          f"({100 * (b[0] - b[1]) / s[1]:.1f}% of the off step); whole steps {s[0]:.2f} / {s[1]:.2f} ms, "
          f"ratio {s[0] / s[1]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mlp")
