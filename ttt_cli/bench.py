"""`ttt bench`: the SPEC §8 performance figures, variants interleaved A B A B in one process."""

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench_figures import judge, spec
from .errors import ConfigError
from .progress import NullProgress

LAYER_T = 4096
# Measurement groups: the figures each one produces (a run measures only the groups it needs).
GROUPS = {
    "step": ("step_overhead_b1", "step_overhead_b8", "step_overhead_b8_floor", "step_ms_p99_b1"),
    "layer": ("ttt_layer_ratio",),
    "score": ("eval_block_speedup", "eval_nll_max_abs_diff"),
    "memory": ("eval_memory_ratio",),
    "cache": ("eval_cache_encode_seconds",),
    "scaleout": ("scaleout_speedup_2",),
}
MEASURED = tuple(n for names in GROUPS.values() for n in names)


@dataclass
class Figure:
    """One measured figure; `target` and `passed` come from the registry (`ttt_cli.bench_figures`)."""

    name: str
    value: float
    target: float | None = None
    passed: bool | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None  # a measurement whose precondition failed: counts as a missed target


@dataclass
class BenchOptions:
    """What `ttt bench` measures.

    Args:
        model: model to measure (default the `bench` preset).
        device, dtype: as every command.
        quick: fewer steps and shorter documents.
        steps: steps per measurement (LMGen steps per variant and batch size; positions scored by
            the eval figures); None = 1024 / 1500 (320 / 500 with `quick`).
        rounds: interleaved A/B rounds.
        seed: random seed of the synthetic inputs.
        only: figure names to measure (None = every figure `ttt bench` measures).
        targets: overrides of registry targets ({name: target}, `--target NAME=VALUE`).
    """

    model: str = "bench"
    device: str = "auto"
    dtype: str = "auto"
    quick: bool = False
    steps: int | None = None
    rounds: int = 4
    seed: int = 0
    only: list[str] | None = None
    targets: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchResult:
    device: str
    versions: dict
    model: str
    config: dict
    figures: list[Figure]
    date: str
    seconds: float

    @property
    def missed(self) -> list[Figure]:
        """Figures whose target was not met."""
        return [f for f in self.figures if f.passed is False]

    @property
    def exit_code(self) -> int:
        """SPEC §5.5: 0 when every target is met, 1 when one is missed."""
        return 1 if self.missed else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["figures"] = [{"name": f.name, "value": f.value, "target": f.target, "pass": f.passed,
                         "direction": spec(f.name).direction, "unit": spec(f.name).unit,
                         **({"error": f.error} if f.error else {}), **f.detail} for f in self.figures]
        d["exit_code"] = self.exit_code
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


def layer_ratio(m, device: str, T: int = LAYER_T, reps: int = 5) -> dict:
    """TTT layer forward on T tokens vs moshi's plain gating with the same slow weights."""
    from moshi.modules.gating import ActivationGating
    from .fastweights.attach import ttt_layers

    i, layer = next(iter(ttt_layers(m.lm).items()))
    plain = ActivationGating(layer.dim, 4 * layer.dim, layer.activation)
    plain.linear_in, plain.linear_out = layer.linear_in, layer.linear_out
    dt = next(layer.linear_in.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, layer.dim, generator=g).to(device, dt)
    x0 = torch.randn(1, T, layer.dim, generator=g).to(device, dt)
    ta, tb = [], []
    with torch.no_grad():
        for r in range(reps + 1):
            layer._x0.input = x0
            _sync(device)
            t = time.perf_counter()
            layer(x)
            _sync(device)
            a = time.perf_counter() - t
            _sync(device)
            t = time.perf_counter()
            plain(x)
            _sync(device)
            b = time.perf_counter() - t
            if r:  # first round is warm-up
                ta.append(a)
                tb.append(b)
        layer._x0.input = None
    d, h = layer.dim, layer.hidden
    k = layer.target_generator.conv1d.kernel_size
    # MACs per token: plain = gate+up (2hd) + down (hd); TTT adds Δ = V̂ᵀZ (hd) and the target ((K+1)d²).
    floor = (4 * h * d + (k + 1) * d * d) / (3 * h * d)
    return {"ttt_ms": 1e3 * statistics.median(ta), "plain_ms": 1e3 * statistics.median(tb),
            "ratio": statistics.median(ta) / statistics.median(tb), "flop_floor": floor, "layer": i, "T": T}


def selected(only: list[str] | None) -> list[str]:
    """The figures to measure, in registry order; ConfigError for names `ttt bench` cannot measure."""
    if not only:
        return list(MEASURED)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    for n in names:
        spec(n)  # unknown names: the registry's message
        if n not in MEASURED:
            raise ConfigError(f"--only {n}: `ttt bench` does not measure this figure yet. It measures: "
                              f"{', '.join(MEASURED)}.")
    if not names:
        raise ConfigError("--only: give at least one figure name.")
    return [n for n in MEASURED if n in names]


def run_bench(opts: BenchOptions, progress=None) -> BenchResult:
    """Measures the selected §8 figures on one device and judges them against the registry's targets.

    Args:
        opts: model, device, dtype, quick mode, steps, rounds, figure selection and target overrides.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    from .models.loader import load_model

    progress = progress or NullProgress()
    wanted = selected(opts.only)
    for name in opts.targets:
        if name not in wanted:
            raise ConfigError(f"--target {name}: that figure is not measured in this run.")
    if opts.steps is not None and opts.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {opts.steps}.")
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    on = load_model(opts.model, device=opts.device, dtype=opts.dtype)
    if not on.ttt or not on.ttt.layers:
        raise ConfigError(f"{on.model_id} has no TTT layers: nothing to measure (pass --ttt-layers to a base model).")
    dev = on.device
    need = {g for g, names in GROUPS.items() if set(names) & set(wanted)}
    values: dict[str, Figure] = {}
    if "step" in need:
        values.update(step_figures(on, opts, wanted, progress))
    if "layer" in need:
        progress.start("layer", f"TTT layer vs plain gating, T={LAYER_T}", None)
        lr = layer_ratio(on, dev)
        progress.finish("layer", ratio=lr["ratio"])
        values["ttt_layer_ratio"] = Figure("ttt_layer_ratio", lr["ratio"], detail=lr)
    if "score" in need:
        values.update(score_figures(on, opts, progress))
    if need & {"memory", "cache"}:
        values.update(eval_run_figures(on, opts, "memory" in need, "cache" in need, progress))
    if "scaleout" in need:
        from .bench_scaleout import scaleout_figure
        values["scaleout_speedup_2"] = scaleout_figure(on, opts, progress)
    measured = {n: f.value for n, f in values.items()}
    figs = []
    for name in wanted:
        f = values[name]
        f.target, f.passed = judge(name, f.value, measured, opts.targets)
        if f.error and f.passed is not None:
            f.passed = False
        figs.append(f)
    return BenchResult(device_name(dev), versions(), on.model_id, on.config.get("ttt") or {}, figs,
                       _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       time.perf_counter() - t_start)


def step_figures(on, opts: BenchOptions, wanted: list[str], progress) -> dict[str, Figure]:
    """LMGen.step TTT on / off (plain moshi, `ttt=False`) at batch 1 and/or 8, and the batch-8 floor."""
    from .models.loader import load_model
    from .fastweights.attach import ttt_layers

    steps = opts.steps or (320 if opts.quick else 1024)  # > chunk_size 256: updates included
    off = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt=False)
    dev = on.device
    b8 = bool({"step_overhead_b8", "step_overhead_b8_floor"} & set(wanted))
    sizes = [B for B, want in ((1, bool({"step_overhead_b1", "step_ms_p99_b1"} & set(wanted))), (8, b8)) if want]
    out: dict[str, Figure] = {}
    stats_b: dict[int, dict] = {}
    for B in sizes:
        progress.start(f"step{B}", f"LMGen.step TTT on/off, batch {B}", None)
        stats, _ = step_overhead(on, off, B, steps, opts.rounds, dev, opts.seed)
        stats_b[B] = stats
        ratio = stats["on"]["median_ms"] / stats["off"]["median_ms"]
        progress.finish(f"step{B}", ratio=ratio)
        out[f"step_overhead_b{B}"] = Figure(f"step_overhead_b{B}", ratio, detail={"on": stats["on"], "off": stats["off"]})
    if 1 in stats_b:
        st = stats_b[1]["on"]
        out["step_ms_p99_b1"] = Figure("step_ms_p99_b1", st["p99_ms"], detail={"median_ms": st["median_ms"],
                                                                               "max_ms": st["max_ms"]})
    if b8:  # batch-8 memory floor: reading 8 streams' fp32 fast weights each step, at the measured bandwidth
        bw = memory_bandwidth(dev)
        extra = sum(8 * l.dim * l.hidden * 4 for l in ttt_layers(on.lm).values())
        floor = 1 + (extra / bw) / (stats_b[8]["off"]["median_ms"] / 1e3)
        out["step_overhead_b8_floor"] = Figure("step_overhead_b8_floor", floor, detail={
            "extra_bytes_per_step": extra, "bandwidth_gb_s": bw / 1e9})
        out["step_overhead_b8"].detail["floor"] = floor
    del off
    return out


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


def score_figures(m, opts: BenchOptions, progress) -> dict[str, Figure]:
    """Block vs step-by-step scoring of the same random codes (with a fast-weight reset inside)."""
    from evals.scoring import score_document

    lm = m.lm
    T = opts.steps or (500 if opts.quick else 1500)
    g = torch.Generator().manual_seed(opts.seed)
    codes = torch.full((lm.num_codebooks, T), lm.zero_token_id, dtype=torch.long)
    codes[1:1 + lm.dep_q] = torch.randint(0, lm.card, (lm.dep_q, T), generator=g)
    progress.start("score", f"eval scoring: blocks of 250 vs one step at a time, {T} steps", None)
    block_runs = []
    step = None
    for r in range(3):  # block, step, block: interleaved, the faster block run counts
        if r == 1:
            step = score_document(lm, codes, resets=[T // 3], step_by_step=True)
        else:
            block_runs.append(score_document(lm, codes, resets=[T // 3], block_steps=250))
    block = min(block_runs, key=lambda s: s.seconds)
    tokens = int(torch.isfinite(block.nll).sum())
    speed = (tokens / block.seconds) / (tokens / step.seconds)
    diff = float((block.nll - step.nll).nan_to_num().abs().max())
    progress.finish("score", speedup=speed, max_abs_diff=diff)
    return {"eval_block_speedup": Figure("eval_block_speedup", speed, detail={
                "block_tokens_per_s": tokens / block.seconds, "step_tokens_per_s": tokens / step.seconds, "steps": T}),
            "eval_nll_max_abs_diff": Figure("eval_nll_max_abs_diff", diff)}


def eval_run_figures(m, opts: BenchOptions, memory: bool, cache: bool, progress) -> dict[str, Figure]:
    """`ttt eval` in its own processes: peak memory (long vs short document) and a re-run on cached codes."""
    out: dict[str, Figure] = {}
    # Full: the §8 pair (30 vs 5 minutes). --quick keeps the 6:1 ratio on 12 vs 2 minutes.
    long_s, short_s = (720.0, 120.0) if opts.quick else (1800.0, 300.0)
    with tempfile.TemporaryDirectory(prefix="ttt-bench-") as tmp:
        root = Path(tmp)
        docs = (("short", short_s), ("long", long_s)) if memory else (("short", short_s),)
        for name, secs in docs:
            data = root / name / "spk" / "book"
            data.mkdir(parents=True)
            _write_wav_chunked(data / "part1.wav", secs, seed=1)
        common = ["--model", opts.model, "--device", m.device, "--dtype", opts.dtype, "-p", "document",
                  "--codes-cache", str(root / "cache"), "--overwrite", "--max-seconds", "7200"]
        rss = {}
        for name, secs in docs:
            progress.start(f"mem-{name}", f"ttt eval on a {secs / 60:.0f}-minute document (own process)", None)
            t = time.perf_counter()
            rss[name] = _peak_rss_of(["eval", "librilight", str(root / name), "--out", str(root / f"out-{name}"), *common])
            progress.finish(f"mem-{name}", peak_rss_mib=rss[name] / 2**20, seconds=time.perf_counter() - t)
        if memory:
            out["eval_memory_ratio"] = Figure("eval_memory_ratio", rss["long"] / rss["short"], detail={
                "peak_rss_long_mib": rss["long"] / 2**20, "peak_rss_short_mib": rss["short"] / 2**20,
                "long_seconds": long_s, "short_seconds": short_s})
        if cache:
            progress.start("cache", "second ttt eval on cached codes", None)
            _peak_rss_of(["eval", "librilight", str(root / "short"), "--out", str(root / "out-again"), *common])
            res = json.loads((root / "out-again" / "results.json").read_text())
            enc = float(res["timing"]["encode_seconds_this_run"])
            hits = int(res["codes_cache"]["hits"])
            progress.finish("cache", encode_seconds=enc, hits=hits)
            out["eval_cache_encode_seconds"] = Figure("eval_cache_encode_seconds", enc, detail={"cache_hits": hits},
                                                      error=None if hits >= 1 else "no codes cache hit")
    return out
