"""`ttt bench`: the SPEC §8 performance figures, TTT on/off interleaved A B A B in one process, per fast-weight variant."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .progress import NullProgress

TARGETS = {
    "step_overhead_b1": 1.10, "step_overhead_b8": 1.15, "eval_block_speedup": 10.0,
    "eval_nll_max_abs_diff": 1e-4, "eval_memory_ratio": 1.10, "eval_cache_encode_seconds": 0.5,
    "ttt_layer_ratio": 2.0, "memory_per_stream_error": 0.10,
}
# Per-variant figures (SPEC §5.5): In-Place's names, and the same with the variant's suffix (`_mlp`, `_adapter`).
VARIANT_FIGURES = ("step_overhead_b1", "step_overhead_b8", "step_overhead_b8_floor", "step_ms_p99_b1",
                   "ttt_layer_ratio", "memory_per_stream_error")
for _suffix in ("_mlp", "_adapter"):
    TARGETS.update({n + _suffix: TARGETS[n] for n in VARIANT_FIGURES if n in TARGETS})
LAYER_T = 4096


@dataclass
class Figure:
    name: str
    value: float
    target: float | None
    passed: bool | None
    detail: dict = field(default_factory=dict)


@dataclass
class BenchOptions:
    model: str = "bench"
    device: str = "auto"
    dtype: str = "auto"
    quick: bool = False
    steps: int | None = None        # LMGen steps per variant and batch size
    rounds: int = 4                 # interleaved A/B rounds
    seed: int = 0
    variants: list[str] | None = None  # fast-weight variants attached to the model's base (None: all)
    eval: bool = True               # the eval figures (scoring speed, memory on long documents, cache)


@dataclass
class BenchResult:
    device: str
    versions: dict
    model: str
    config: dict
    figures: list[Figure]
    date: str
    seconds: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["figures"] = [{"name": f.name, "value": f.value, "target": f.target, "pass": f.passed, **f.detail}
                        for f in self.figures]
        return d


def versions() -> dict:
    import moshi
    from . import __version__
    return {"ttt": __version__, "moshi": getattr(moshi, "__version__", "?"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _gen_steps(gen, B: int, n: int, device: str, g: torch.Generator) -> list[float]:
    """Times `n` LMGen.step calls (depformer included) in the generator's current stream."""
    times = []
    for _ in range(n):
        x = torch.randint(0, gen.lm_model.card, (B, gen.lm_model.n_q - gen.lm_model.dep_q, 1), generator=g).to(device)
        _sync(device)
        t = time.perf_counter()
        gen.step(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def step_overhead(on, off, B: int, steps: int, rounds: int, device: str, seed: int) -> tuple[dict, dict]:
    """Median step times of TTT on vs off, interleaved in `rounds` blocks that cross chunk boundaries."""
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_cuda_graph

    g = torch.Generator().manual_seed(seed)
    gens = {"on": LMGen(on.lm, use_sampling=False), "off": LMGen(off.lm, use_sampling=False)}
    times: dict[str, list[float]] = {"on": [], "off": []}
    per = max(1, steps // rounds)
    with torch.no_grad(), no_cuda_graph(), gens["on"].streaming(B), gens["off"].streaming(B):
        for name in gens:  # warm-up
            _gen_steps(gens[name], B, 4, device, g)
        for _ in range(rounds):
            for name in ("on", "off"):
                times[name] += _gen_steps(gens[name], B, per, device, g)
    stats = {k: {"median_ms": 1e3 * statistics.median(v), "p99_ms": 1e3 * _pct(v, 0.99),
                 "max_ms": 1e3 * max(v), "steps": len(v)} for k, v in times.items()}
    return stats, times


def memory_bandwidth(device: str, mib: int = 256) -> float:
    """Bytes/s of a large read (sum over a buffer), the floor for reading per-stream fast weights."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def layer_ratio(layer, device: str, T: int = LAYER_T, reps: int = 5) -> dict:
    """A fast-weight layer's forward on T tokens vs the plain layer it extends (the layer's `layer_bench`)."""
    lb = layer.layer_bench(T, device)
    ta, tb = [], []
    with torch.no_grad():
        for r in range(reps + 1):
            for fn, acc in ((lb.ttt, ta), (lb.plain, tb)):
                _sync(device)
                t = time.perf_counter()
                fn()
                _sync(device)
                if r:  # first round is warm-up
                    acc.append(time.perf_counter() - t)
    return {"ttt_ms": 1e3 * statistics.median(ta), "plain_ms": 1e3 * statistics.median(tb),
            "ratio": statistics.median(ta) / statistics.median(tb), "flop_floor": lb.flop_floor,
            "flop_floor_formula": lb.formula, "compared": lb.what, "T": T}


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the distinct tensors reachable from a streaming state (dataclass fields, dicts, lists)."""
    import dataclasses
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def measured_bytes_per_stream(layer) -> int:
    """Bytes one more stream adds to a layer's streaming state (B = 2 minus B = 1: shared tensors cancel)."""
    sizes = []
    saved = layer._streaming_state
    layer._streaming_state = None
    try:
        for B in (1, 2):
            with layer.streaming(B):
                sizes.append(_tensor_bytes(layer._streaming_state, set()))
    finally:
        layer._streaming_state = saved
    return sizes[1] - sizes[0]


def variant_figures(opts: BenchOptions, overrides: dict, steps: int, progress) -> tuple[list[Figure], tp.Any]:
    """Step overhead (b1, b8, floor, p99), layer ratio and memory per stream of one variant on `opts.model`.

    TTT off is the same model with its fast weights frozen (rate 0, SPEC §5.5). Returns the figures and
    the TTT-on model.
    """
    from .models.loader import load_model
    from .fastweights.attach import ttt_layers

    with warnings.catch_warnings():  # another variant on this base has no tensors: its fresh init is expected
        warnings.simplefilter("ignore", UserWarning)
        on = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt=overrides or None)
        off = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt={**overrides, "lr": 0.0})
    layers = ttt_layers(on.lm)
    first = next(iter(layers.values()))
    sfx, name = first.figure_suffix, first.variant
    dev = on.device
    figs: list[Figure] = []
    stats_b: dict[int, dict] = {}
    for B in (1, 8):
        progress.start(f"step{B}{sfx}", f"{name}: LMGen.step TTT on/off, batch {B}", None)
        stats, _ = step_overhead(on, off, B, steps, opts.rounds, dev, opts.seed)
        stats_b[B] = stats
        ratio = stats["on"]["median_ms"] / stats["off"]["median_ms"]
        progress.finish(f"step{B}{sfx}", ratio=ratio)
        figs.append(Figure(f"step_overhead_b{B}{sfx}", ratio, TARGETS[f"step_overhead_b{B}"], None,
                           {"variant": name, "on": stats["on"], "off": stats["off"]}))
    # batch-8 memory floor: reading 8 streams' fp32 fast state each step, at the measured bandwidth
    bw = memory_bandwidth(dev)
    extra = sum(8 * l.bytes_read_per_step() for l in layers.values())
    floor = 1 + (extra / bw) / (stats_b[8]["off"]["median_ms"] / 1e3)
    figs.append(Figure(f"step_overhead_b8_floor{sfx}", floor, None, None,
                       {"variant": name, "extra_bytes_per_step": extra, "bandwidth_gb_s": bw / 1e9}))
    figs.append(Figure(f"step_ms_p99_b1{sfx}", stats_b[1]["on"]["p99_ms"], None, None,
                       {"variant": name, "median_ms": stats_b[1]["on"]["median_ms"],
                        "max_ms": stats_b[1]["on"]["max_ms"]}))
    figs[0].passed = figs[0].value <= figs[0].target
    figs[1].passed = figs[1].value <= figs[1].target or figs[1].value <= 1.10 * floor
    figs[1].detail["floor"] = floor
    del off

    progress.start(f"layer{sfx}", f"{name}: TTT layer vs plain layer, T={LAYER_T}", None)
    lr = layer_ratio(first, dev)
    progress.finish(f"layer{sfx}", ratio=lr["ratio"])
    target = TARGETS["ttt_layer_ratio"]
    figs.append(Figure(f"ttt_layer_ratio{sfx}", lr["ratio"], target, lr["ratio"] <= target,
                       {"variant": name, "layer": next(iter(layers)), **lr}))

    predicted = sum(l.state_bytes_per_stream() for l in layers.values())
    measured = sum(measured_bytes_per_stream(l) for l in layers.values())
    err = abs(measured - predicted) / max(predicted, 1)
    target = TARGETS["memory_per_stream_error"]
    figs.append(Figure(f"memory_per_stream_error{sfx}", err, target, err <= target,
                       {"variant": name, "predicted_bytes": predicted, "measured_bytes": measured,
                        "formula": " + ".join(l.memory_formula() for l in layers.values()),
                        "measured_as": "bytes of the per-stream state tensors (B=2 minus B=1)"}))
    return figs, on


def run_bench(opts: BenchOptions, progress=None) -> BenchResult:
    """Measures the §8 figures on one device and returns them with provenance.

    The model's own fast-weight variant gives the unsuffixed figures when it is In-Place; every
    variant in `opts.variants` (default: all) is attached to the same base model and measured with
    its suffix (SPEC §5.5), one after the other in this process.

    Args:
        opts: model, device, dtype, quick mode, steps, rounds, variants.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    from .fastweights.config import VARIANTS
    from .models.config import resolve_ttt_config
    from .models.resolver import resolve

    progress = progress or NullProgress()
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    steps = opts.steps or (320 if opts.quick else 1024)  # > chunk_size 256: updates included
    figs: list[Figure] = []
    own = None
    res = resolve(opts.model)
    own_cfg, _ = resolve_ttt_config(res.config, int(res.config.get("num_layers", 32)))
    variant = own_cfg.variant if own_cfg is not None else "inplace"  # the model's own variant goes first
    for variant in (opts.variants or [variant] + [v for v in VARIANTS if v != variant]):
        vf, on = variant_figures(opts, {"variant": variant}, steps, progress)
        figs += vf
        if own is None:
            own = on  # the eval figures and the recorded config are the first variant's
        else:
            del on
    if opts.eval:
        figs += eval_figures(own, opts, progress)
    return BenchResult(device_name(own.device), versions(), own.model_id, own.config.get("ttt") or {}, figs,
                       _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       time.perf_counter() - t_start)


# -- eval figures ------------------------------------------------------------------------------

def _write_wav_chunked(path: Path, seconds: float, seed: int, sr: int = 24000) -> None:
    """A long synthetic speech-like signal (AM tones + noise), written in pieces: the parent stays small."""
    import wave
    import numpy as np
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


def _peak_rss_of(cmd_args: list[str]) -> int:
    """Peak RSS (bytes) of one `ttt ...` run in its own process."""
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


def eval_figures(m, opts: BenchOptions, progress) -> list[Figure]:
    """Block vs step-by-step scoring, eval peak memory (long vs short document), cached re-run."""
    from evals.scoring import score_document

    figs: list[Figure] = []
    lm = m.lm
    T = 500 if opts.quick else 1500
    g = torch.Generator().manual_seed(opts.seed)
    codes = torch.full((lm.num_codebooks, T), lm.zero_token_id, dtype=torch.long)
    codes[1:1 + lm.dep_q] = torch.randint(0, lm.card, (lm.dep_q, T), generator=g)
    progress.start("score", f"eval scoring: blocks of 250 vs one step at a time, {T} steps", None)
    block_runs = []
    step = None
    for r in range(3):  # block, step, block: interleaved, the median block run counts
        if r == 1:
            step = score_document(lm, codes, resets=[T // 3], step_by_step=True)
        else:
            block_runs.append(score_document(lm, codes, resets=[T // 3], block_steps=250))
    block = min(block_runs, key=lambda s: s.seconds)
    tokens = int(torch.isfinite(block.nll).sum())
    speed = (tokens / block.seconds) / (tokens / step.seconds)
    diff = float((block.nll - step.nll).nan_to_num().abs().max())
    progress.finish("score", speedup=speed, max_abs_diff=diff)
    figs.append(Figure("eval_block_speedup", speed, TARGETS["eval_block_speedup"], speed >= TARGETS["eval_block_speedup"],
                       {"block_tokens_per_s": tokens / block.seconds, "step_tokens_per_s": tokens / step.seconds,
                        "steps": T}))
    figs.append(Figure("eval_nll_max_abs_diff", diff, TARGETS["eval_nll_max_abs_diff"],
                       diff <= TARGETS["eval_nll_max_abs_diff"]))

    # Full: the §8 pair (30 vs 5 minutes). --quick keeps the 6:1 ratio on 12 vs 2 minutes.
    long_s, short_s = (720.0, 120.0) if opts.quick else (1800.0, 300.0)
    with tempfile.TemporaryDirectory(prefix="ttt-bench-") as tmp:
        root = Path(tmp)
        rss = {}
        for name, secs in (("short", short_s), ("long", long_s)):
            data = root / name / "spk" / "book"
            data.mkdir(parents=True)
            _write_wav_chunked(data / "part1.wav", secs, seed=1)
        common = ["--model", opts.model, "--device", m.device, "--dtype", opts.dtype, "-p", "document",
                  "--codes-cache", str(root / "cache"), "--overwrite", "--max-seconds", "7200"]
        for name, secs in (("short", short_s), ("long", long_s)):
            progress.start(f"mem-{name}", f"ttt eval on a {secs / 60:.0f}-minute document (own process)", None)
            t = time.perf_counter()
            rss[name] = _peak_rss_of(["eval", "librilight", str(root / name), "--out", str(root / f"out-{name}"), *common])
            progress.finish(f"mem-{name}", peak_rss_mib=rss[name] / 2**20, seconds=time.perf_counter() - t)
        ratio = rss["long"] / rss["short"]
        figs.append(Figure("eval_memory_ratio", ratio, TARGETS["eval_memory_ratio"], ratio <= TARGETS["eval_memory_ratio"],
                           {"peak_rss_long_mib": rss["long"] / 2**20, "peak_rss_short_mib": rss["short"] / 2**20,
                            "long_seconds": long_s, "short_seconds": short_s}))
        progress.start("cache", "second ttt eval on cached codes", None)
        _peak_rss_of(["eval", "librilight", str(root / "short"), "--out", str(root / "out-again"), *common])
        res = json.loads((root / "out-again" / "results.json").read_text())
        enc = float(res["timing"]["encode_seconds_this_run"])
        hits = int(res["codes_cache"]["hits"])
        progress.finish("cache", encode_seconds=enc, hits=hits)
        figs.append(Figure("eval_cache_encode_seconds", enc, TARGETS["eval_cache_encode_seconds"],
                           enc <= TARGETS["eval_cache_encode_seconds"] and hits >= 1, {"cache_hits": hits}))
    return figs
