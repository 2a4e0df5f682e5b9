"""Scale-out figures (SPEC §5.5, §5.6, §8.10): `ttt eval` with 2 torchrun processes vs 1, whole and steady state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The bench encodes the documents' codes by running the eval in this process (SPEC §5.0's API), so that
# the measured jobs start on a warm codes cache without a launch of their own; nothing in evals imports
# ttt_cli.bench.
from evals.librilight.options import EvalOptions
from evals.librilight.protocol import evaluate_librilight

from ..models.loader import TTTModel
from .options import BenchOptions
from .processes import write_wav_chunked
from .results import Figure

BOOKS = 4                         # equal documents: 2 ranks get 2 each
# The points each rank's eval records (`ttt_cli.timeline`, results.json's timing.ranks) and the phase that
# ends at each: "launch" from the bench starting torchrun to the rank's Python importing ttt, "cli" the
# command line's own imports, then torch's import, ours (moshi, the eval), joining the process group,
# checking data and --out, loading the model, the run's setup (Mimi fingerprint, resume record, shares),
# scoring (the steady state), and on rank 0 waiting for the others and merging their records.
PHASES = (("launch", "process"), ("cli", "command"), ("torch_import", "torch_imported"), ("imports", "imported"),
          ("join", "joined"), ("check", "model_load_started"), ("model_load", "model_loaded"),
          ("setup", "scoring_started"), ("scoring", "scoring_done"), ("merge", "merged"))


@dataclass
class Job:
    """One torchrun job of the figure: its wall time and what its ranks recorded."""

    started: float                # Unix time the bench started torchrun
    ended: float                  # Unix time torchrun returned
    ranks: dict[str, dict]        # {rank: {point: Unix time}}
    tokens: int                   # tokens scored (every rank)
    hits: int                     # codes cache hits (every document, once warm)

    @property
    def wall(self) -> float:
        return self.ended - self.started

    @property
    def scoring(self) -> float:
        """Seconds from the first rank starting to score to the last one done: the job's steady state."""
        return max(p["scoring_done"] for p in self.ranks.values()) - \
            min(p["scoring_started"] for p in self.ranks.values())

    @property
    def fixed(self) -> float:
        """Seconds of the job outside its steady state: launch, imports, load, setup, merge, writing, exit."""
        return self.wall - self.scoring

    def phases(self) -> dict[str, dict[str, float]]:
        """{rank: {phase: seconds}}, the last phase "finish" up to torchrun's return (writing, barrier, exit)."""
        out = {}
        for r, p in sorted(self.ranks.items()):
            prev, d = self.started, {}
            for phase, point in PHASES:
                if point in p:
                    d[phase], prev = p[point] - prev, p[point]
            d["finish"] = self.ended - prev
            out[r] = {k: round(v, 3) for k, v in d.items()}
        return out


def _torchrun_eval(n: int, data: Path, out: Path, common: list[str]) -> Job:
    """`torchrun --nproc-per-node N -m ttt_cli eval librilight ...` timed from here, with its ranks' points."""
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}  # one thread per process, 1 and 2 alike
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "ttt_cli",
           "eval", "librilight", str(data), "--out", str(out), *common]
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ended = time.time()
    if p.returncode != 0:
        raise RuntimeError(f"torchrun with {n} process(es) failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    res = json.loads((out / "results.json").read_text())
    return Job(t, ended, res["timing"]["ranks"], int(res["policies"]["document"]["tokens"]["all"]),
               int(res["codes_cache"]["hits"]))


def _warm_cache(m: TTTModel, model: str, data: Path, out: Path, common: list[str], cache: Path, dtype: str) -> None:
    """Fills the codes cache of `data`: an eval in this process on the loaded model (CPU), else a torchrun job."""
    if str(m.device) == "cpu":
        evaluate_librilight(EvalOptions(data=data, out=out, model=model, codes_cache=cache, device="cpu",
                                        dtype=dtype, overwrite=True), model=m)
    else:  # the ranks encode on the CPU: codes the bench's device encodes are not theirs
        _torchrun_eval(1, data, out, common)


def scaleout_figures(m: TTTModel, opts: BenchOptions, names: set[str], progress) -> dict[str, Figure]:
    """`ttt eval` of BOOKS equal documents on cached codes, 1 and 2 processes interleaved (1 2 1 2 in full),
    the best of each counts: tokens/s with 2 / with 1 over the whole job (`scaleout_speedup_2`: launch and load
    included, as a user's job) and over its steady state (`scaleout_steady_speedup_2`: from the first rank
    starting to score to the last one done, as the ranks record it), and the job's seconds outside its steady
    state (`scaleout_fixed_s_per_rank`: what every rank pays once, whatever the documents; its phases in detail).

    Args:
        m: the model as loaded: on the CPU it encodes the codes the jobs find cached (each job's processes
            load `opts.model` themselves).
        opts: the run's options (`model`, `dtype`, `sizes`: the documents' length, the rounds).
        names: the scale-out figures wanted.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    seconds, rounds = opts.sizes.scaleout_seconds, opts.sizes.scaleout_rounds
    with tempfile.TemporaryDirectory(prefix="ttt-bench-scaleout-") as tmp:
        root = Path(tmp)
        for b in range(BOOKS):
            (root / "data" / "spk" / f"book{b}").mkdir(parents=True)
            write_wav_chunked(root / "data" / "spk" / f"book{b}" / "part1.wav", seconds, seed=b)
        common = ["--model", opts.model, "--device", "cpu", "--dtype", opts.dtype, "-p", "document",
                  "--codes-cache", str(root / "cache"), "--overwrite"]
        progress.start("scaleout", f"ttt eval, {BOOKS} x {seconds:g} s documents: 1 vs 2 processes (torchrun, "
                                   f"gloo)", None)
        _warm_cache(m, opts.model, root / "data", root / "warm", common, root / "cache", opts.dtype)
        jobs: dict[int, list[Job]] = {1: [], 2: []}
        for _ in range(rounds):
            for n in (1, 2):
                jobs[n].append(_torchrun_eval(n, root / "data", root / f"out-{n}", common))
        whole = {n: min(js, key=lambda j: j.wall) for n, js in jobs.items()}
        steady = {n: min(js, key=lambda j: j.scoring) for n, js in jobs.items()}
        tokens = whole[2].tokens
        tps = {n: tokens / j.wall for n, j in whole.items()}
        tps_steady = {n: tokens / j.scoring for n, j in steady.items()}
        speedup, steady_speedup = tps[2] / tps[1], tps_steady[2] / tps_steady[1]
        fixed_job = {n: min(js, key=lambda j: j.fixed) for n, js in jobs.items()}
        fixed = fixed_job[2].fixed
        cold = [j.hits for js in jobs.values() for j in js if j.hits < BOOKS]
        progress.finish("scaleout", speedup=speedup, steady_speedup=steady_speedup, fixed_s=fixed)
    error = f"codes cache hits {cold} of {BOOKS}: a job encoded" if cold else None
    context = {"documents": BOOKS, "document_seconds": seconds, "tokens": tokens, "rounds": rounds, "device": "cpu",
               "backend": "gloo", "cpu_cores": os.cpu_count(),
               "load_average_1m_after": os.getloadavg()[0]}  # other work on the cores caps what 2 processes gain
    out = {
        "scaleout_speedup_2": Figure("scaleout_speedup_2", speedup, detail={
            "tokens_per_s_1": tps[1], "tokens_per_s_2": tps[2], "parallel_efficiency": speedup / 2,
            "wall_seconds_1": [j.wall for j in jobs[1]], "wall_seconds_2": [j.wall for j in jobs[2]], **context},
            error=error),
        "scaleout_steady_speedup_2": Figure("scaleout_steady_speedup_2", steady_speedup, detail={
            "tokens_per_s_1": tps_steady[1], "tokens_per_s_2": tps_steady[2],
            "parallel_efficiency": steady_speedup / 2, "scoring_seconds_1": [j.scoring for j in jobs[1]],
            "scoring_seconds_2": [j.scoring for j in jobs[2]], **context}, error=error),
        "scaleout_fixed_s_per_rank": Figure("scaleout_fixed_s_per_rank", fixed, detail={
            "fixed_seconds_1": fixed_job[1].fixed, "phases_2": fixed_job[2].phases(),
            "phases_1": fixed_job[1].phases(), **context}, error=error),
    }
    return {k: v for k, v in out.items() if k in names}
