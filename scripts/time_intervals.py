"""Times the bootstrap intervals of `ttt eval` (docs/eval.md, Intervals): on a results.json (recomputed from its
`documents[].scores`, and checked against the intervals it holds), or on a synthetic corpus.

    python scripts/time_intervals.py out/results.json
    python scripts/time_intervals.py --synthetic 1000 60 5   # documents, bins, policies
"""

import json
import sys
import time

import numpy as np

from evals.intervals import Bootstrap, UnitScores, policy_intervals


def from_results(path: str) -> tuple[dict, dict]:
    r = json.load(open(path, encoding="utf-8"))
    b = r["bootstrap"]
    scores = {p: [UnitScores((d["scores"][p]["nll_sum"], d["scores"][p]["tokens"]),
                             list(zip(d["scores"][p]["bins"]["nll_sum"], d["scores"][p]["bins"]["tokens"])))
                  for d in r["documents"]] for p in r["policies"]}
    return scores, {"boot": Bootstrap(b["resamples"], b["seed"], b["unit"]), "results": r}


def synthetic(docs: int, bins: int, policies: int) -> dict:
    rng = np.random.default_rng(0)
    scores = {}
    for k in range(policies):
        units = []
        for _ in range(docs):
            b = [(float(rng.normal(4.5, 0.3) * 1000), 1000.0) for _ in range(int(rng.integers(1, bins + 1)))]
            units.append(UnitScores((sum(x for x, _ in b), sum(y for _, y in b)), b))
        scores["off" if k == policies - 1 else f"p{k}"] = units
    return scores


if __name__ == "__main__":
    if sys.argv[1] == "--synthetic":
        d, n, p = map(int, sys.argv[2:5])
        scores, boot, r = synthetic(d, n, p), Bootstrap(1000, 0, "document"), None
    else:
        scores, extra = from_results(sys.argv[1])
        boot, r = extra["boot"], extra["results"]
    t = time.perf_counter()
    iv = policy_intervals(scores, boot)
    print(f"{len(next(iter(scores.values())))} document(s), {len(scores)} policies, {boot.resamples} resamples: "
          f"{time.perf_counter() - t:.2f} s")
    if r is not None:
        same = all(iv[p]["ci"] == r["policies"][p]["ci"] and iv[p]["vs_off"] == r["policies"][p]["vs_off"]
                   for p in r["policies"])
        print("same intervals as results.json:", same)
