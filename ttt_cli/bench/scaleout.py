"""Bench figure `scaleout_speedup_2` (SPEC §5.5, §5.6): `ttt eval` throughput with 2 torchrun processes vs 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..models.loader import TTTModel
from .options import BenchOptions
from .processes import write_wav_chunked
from .results import Figure

BOOKS = 4                         # equal documents: 2 ranks get 2 each


def _torchrun_eval(n: int, data: Path, out: Path, common: list[str]) -> float:
    """Wall seconds of `torchrun --nproc-per-node N -m ttt_cli eval librilight ...` (launch and load included)."""
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}  # one thread per process, 1 and 2 alike
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "ttt_cli",
           "eval", "librilight", str(data), "--out", str(out), *common]
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"torchrun with {n} process(es) failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return wall


def scaleout_figure(m: TTTModel, opts: BenchOptions, progress) -> Figure:
    """`ttt eval` of BOOKS equal documents on cached codes, 1 and 2 processes interleaved (1 2 1 2), the
    faster of each counts: tokens/s with 2 / with 1, and the parallel efficiency (speedup / 2).

    Wall time includes torchrun's launch and each process's model load, as a user's job does; with
    long documents (the point of the tool) that share vanishes, so the figure is a lower bound.

    Args:
        m: the model as loaded (unused: each process loads `opts.model` itself).
        opts: the run's options (`model`, `dtype`, `quick`: 30 s documents instead of 120 s).
        progress: a `Progress` hook (ttt_cli.progress).
    """
    seconds = 30.0 if opts.quick else 120.0
    with tempfile.TemporaryDirectory(prefix="ttt-bench-scaleout-") as tmp:
        root = Path(tmp)
        for b in range(BOOKS):
            (root / "data" / "spk" / f"book{b}").mkdir(parents=True)
            write_wav_chunked(root / "data" / "spk" / f"book{b}" / "part1.wav", seconds, seed=b)
        common = ["--model", opts.model, "--device", "cpu", "--dtype", opts.dtype, "-p", "document",
                  "--codes-cache", str(root / "cache"), "--overwrite"]
        progress.start("scaleout", f"ttt eval, {BOOKS} x {seconds:g} s documents: 1 vs 2 processes (torchrun, "
                                   f"gloo)", None)
        _torchrun_eval(1, root / "data", root / "warm", common)  # encodes and caches the codes
        walls: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(2):
            for n in (1, 2):
                walls[n].append(_torchrun_eval(n, root / "data", root / f"out-{n}", common))
        res = json.loads((root / "out-2" / "results.json").read_text())
        tokens = int(res["policies"]["document"]["tokens"]["all"])
        tps = {n: tokens / min(w) for n, w in walls.items()}
        speedup = tps[2] / tps[1]
        progress.finish("scaleout", speedup=speedup, efficiency=speedup / 2)
    return Figure("scaleout_speedup_2", speedup, detail={
        "tokens_per_s_1": tps[1], "tokens_per_s_2": tps[2], "parallel_efficiency": speedup / 2,
        "wall_seconds_1": walls[1], "wall_seconds_2": walls[2], "documents": BOOKS, "document_seconds": seconds,
        "tokens": tokens, "device": "cpu", "backend": "gloo", "cpu_cores": os.cpu_count(),
        "load_average_1m_after": os.getloadavg()[0]})  # other work on the cores caps what 2 processes can gain
