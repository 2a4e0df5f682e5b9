"""Refill figures (SPEC §8.9) on the bench preset with the update of the completing streams only (new) or of all B
streams, masked (old: the code before issue 26.3), in one process. Usage: python scripts/refill_compare.py new|old quick|full"""
import sys
import time
from ttt_cli.fastweights import inplace_update as iu, inplace
from ttt_cli.bench.options import BenchOptions
from ttt_cli.bench.variants import refill_figures
from ttt_cli.bench.options import load_measured
from ttt_cli.progress import NullProgress

mode = sys.argv[1]
quick = sys.argv[2] == "quick"
if mode == "old":
    new = iu.step_one
    def old(st, rule, z, x0, completing):
        if completing and len(completing) < st.batch_size:
            completing = tuple(range(st.batch_size))  # the update of every stream, masked by `done`
        return new(st, rule, z, x0, completing)
    inplace.step_one = old
opts = BenchOptions(quick=quick)
own = load_measured(opts, {"variant": "inplace"})
t = time.time()
f = refill_figures(own, opts, NullProgress())
r, m = f["step_overhead_b8_refill"], f["step_overhead_b8_mean"]
print(mode, "quick" if quick else "full", f"refill {r.value:.3f} in_phase {m.value:.3f} refill/in_phase {r.value/m.value:.3f}",
      {k: round(r.detail[k]["mean_ms"], 1) for k in ("staggered", "in_phase", "off")}, f"C={r.detail['chunk_size']}", f"{time.time()-t:.0f}s")
