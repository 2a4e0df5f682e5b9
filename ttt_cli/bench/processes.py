"""`ttt bench` figures measured on `ttt` commands in their own processes: peak memory of eval and infer, the codes cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from ..models.loader import TTTModel
from .options import BenchOptions
from .results import Figure


def write_wav_chunked(path: Path, seconds: float, seed: int, sr: int = 24000) -> None:
    """A long synthetic speech-like signal (AM tones + noise), written in pieces: the parent stays small.

    Args:
        path: the 16-bit mono WAV file to write.
        seconds: its duration.
        seed: seed of the noise.
        sr: sample rate (Hz).
    """
    rng = np.random.default_rng(seed)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        done, piece = 0, 10 * sr
        total = int(seconds * sr)
        while done < total:
            n = min(piece, total - done)
            t = (np.arange(done, done + n) / sr)
            f0 = 120 + 40 * np.sin(2 * np.pi * 0.3 * t)
            x = 0.3 * np.sin(2 * np.pi * f0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(n)
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
            done += n


# Runs `ttt` in a fresh interpreter that records its own peak RSS (VmHWM) at exit. VmHWM belongs
# to the address space made by exec; rusage's ru_maxrss would also count the pages a forked
# child shared with this (large) parent before exec, hiding the child's own peak.
_HWM_WRAPPER = """
import atexit, runpy, sys
out = sys.argv[1]
def _hwm():
    with open('/proc/self/status') as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(str(kib * 1024))
atexit.register(_hwm)
sys.argv = ['ttt'] + sys.argv[2:]
runpy.run_module('ttt_cli', run_name='__main__')
"""


def peak_rss_of(cmd_args: list[str]) -> int:
    """Peak RSS (bytes) of one `ttt ...` run in its own process; RuntimeError with its stderr if it fails.

    Args:
        cmd_args: the command's arguments after `ttt`.
    """
    env = {**os.environ, "NO_TORCH_COMPILE": "1"}
    with tempfile.NamedTemporaryFile(suffix=".hwm", delete=False) as f:
        hwm = Path(f.name)
    try:
        p = subprocess.run([sys.executable, "-c", _HWM_WRAPPER, str(hwm), *cmd_args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"`ttt {' '.join(cmd_args[:2])}` failed ({p.returncode}): "
                               f"{p.stderr.decode()[-2000:]}")
        return int(hwm.read_text())
    finally:
        hwm.unlink(missing_ok=True)


def eval_run_figures(m: TTTModel, opts: BenchOptions, memory: bool, cache: bool, progress) -> dict[str, Figure]:
    """`ttt eval` in its own processes: peak memory (long vs short document) and a re-run on cached codes.

    Args:
        m: the model as loaded (its device is passed on).
        opts: the run's options.
        memory: measure `eval_memory_ratio`.
        cache: measure `eval_cache_encode_seconds`.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    out: dict[str, Figure] = {}
    long_s, short_s = opts.sizes.eval_seconds  # full: the §8 pair (30 vs 5 minutes); --quick: the same 6:1 ratio
    with tempfile.TemporaryDirectory(prefix="ttt-bench-") as tmp:
        root = Path(tmp)
        docs = (("short", short_s), ("long", long_s)) if memory else (("short", short_s),)
        for name, secs in docs:
            data = root / name / "spk" / "book"
            data.mkdir(parents=True)
            write_wav_chunked(data / "part1.wav", secs, seed=1)
        common = ["--model", opts.model, "--device", m.device, "--dtype", opts.dtype, "-p", "document",
                  "--codes-cache", str(root / "cache"), "--overwrite", "--max-seconds", "7200"]
        rss = {}
        for name, secs in docs:
            progress.start(f"mem-{name}", f"ttt eval on a {secs:g} s document (own process)", None)
            t = time.perf_counter()
            rss[name] = peak_rss_of(["eval", "librilight", str(root / name), "--out", str(root / f"out-{name}"), *common])
            progress.finish(f"mem-{name}", peak_rss_mib=rss[name] / 2**20, seconds=time.perf_counter() - t)
        if memory:
            out["eval_memory_ratio"] = Figure("eval_memory_ratio", rss["long"] / rss["short"], detail={
                "peak_rss_long_mib": rss["long"] / 2**20, "peak_rss_short_mib": rss["short"] / 2**20,
                "long_seconds": long_s, "short_seconds": short_s})
        if cache:
            progress.start("cache", "second ttt eval on cached codes", None)
            peak_rss_of(["eval", "librilight", str(root / "short"), "--out", str(root / "out-again"), *common])
            res = json.loads((root / "out-again" / "results.json").read_text())
            enc = float(res["timing"]["encode_seconds_this_run"])
            hits = int(res["codes_cache"]["hits"])
            progress.finish("cache", encode_seconds=enc, hits=hits)
            out["eval_cache_encode_seconds"] = Figure("eval_cache_encode_seconds", enc, detail={"cache_hits": hits},
                                                      error=None if hits >= 1 else "no codes cache hit")
    return out


def infer_memory_figures(m: TTTModel, opts: BenchOptions, progress) -> dict[str, Figure]:
    """Peak RSS of `ttt infer` (tiny model, dialog: reads the file, writes Moshi's voice) on a long vs a short
    file, each in its own process (SPEC §5.1: memory flat in the recording's length).

    Args:
        m: the model as loaded (its device is passed on).
        opts: the run's options (`quick`, `dtype`).
        progress: a `Progress` hook (ttt_cli.progress).
    """
    # Full: the SPEC pair (60 vs 5 minutes); --quick the same 12:1 ratio. 16 kHz input, and --whole-file-seconds
    # between the two: the long file goes through the piecewise resampler, the short one through moshi's whole read.
    long_s, short_s = opts.sizes.infer_seconds
    whole = f"{opts.sizes.infer_whole_file_seconds:g}"
    rss, wall = {}, {}
    with tempfile.TemporaryDirectory(prefix="ttt-bench-infer-") as tmp:
        root = Path(tmp)
        for name, secs in (("short", short_s), ("long", long_s)):
            wav = root / f"{name}.wav"
            write_wav_chunked(wav, secs, seed=2, sr=16000)
            progress.start(f"infer-{name}", f"ttt infer on a {secs:g} s file (own process)", None)
            t = time.perf_counter()
            rss[name] = peak_rss_of(["infer", str(wav), "--model", "tiny", "--out", str(root / f"out-{name}"),
                                     "--device", m.device, "--dtype", opts.dtype, "--greedy",
                                     "--whole-file-seconds", whole])
            wall[name] = time.perf_counter() - t
            progress.finish(f"infer-{name}", peak_rss_mib=rss[name] / 2**20, seconds=wall[name])
            wav.unlink()
    return {"infer_memory_ratio": Figure("infer_memory_ratio", rss["long"] / rss["short"], detail={
        "peak_rss_long_mib": rss["long"] / 2**20, "peak_rss_short_mib": rss["short"] / 2**20,
        "long_seconds": long_s, "short_seconds": short_s, "whole_file_seconds": opts.sizes.infer_whole_file_seconds,
        "wall_seconds_long": wall["long"],
        "wall_seconds_short": wall["short"], "model": "tiny", "mode": "dialog"})}
