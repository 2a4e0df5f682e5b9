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
import typing as tp
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bench_figures import judge, spec
from .errors import ConfigError
from .progress import NullProgress

LAYER_T = 4096
# Measurement groups: the figures each one produces (a run measures only the groups it needs).
# The first three are measured per fast-weight variant, their names carrying the variant's suffix.
GROUPS = {
    "step": ("step_overhead_b1", "step_overhead_b8", "step_overhead_b8_floor", "step_ms_p99_b1"),
    "layer": ("ttt_layer_ratio",),
    "state": ("memory_per_stream_error",),
    "score": ("eval_block_speedup", "eval_nll_max_abs_diff"),
    "memory": ("eval_memory_ratio",),
    "cache": ("eval_cache_encode_seconds",),
    "infer_memory": ("infer_memory_ratio",),
    "scaleout": ("scaleout_speedup_2",),
    "telemetry": ("telemetry_overhead_b1",),
}
VARIANT_GROUPS = ("step", "layer", "state")
# A variant's figure-name suffix (SPEC §5.5): In-Place's figures carry §8's names.
SUFFIXES = {"inplace": "", "mlp": "_mlp", "linear-adapter": "_adapter"}
PER_VARIANT = tuple(n for g in VARIANT_GROUPS for n in GROUPS[g])


def variant_names(variant: str) -> list[str]:
    """The per-variant figures of one variant, with its suffix."""
    return [n + SUFFIXES[variant] for n in PER_VARIANT]


def measured_names(variants: tp.Sequence[str] = tuple(SUFFIXES)) -> list[str]:
    """Every figure `ttt bench` measures for these variants, in run order (variants first, then eval)."""
    return [n for v in variants for n in variant_names(v)] + \
        [n for g, names in GROUPS.items() if g not in VARIANT_GROUPS for n in names]


MEASURED = tuple(measured_names())


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
        only: figure names to measure (None = every figure `ttt bench` measures for `variants`).
        targets: overrides of registry targets ({name: target}, `--target NAME=VALUE`).
        variants: fast-weight variants to attach to the model's base and measure (None = all three,
            the model's own first); `only` may name any variant's figures instead.
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
    variants: list[str] | None = None


@dataclass
class BenchResult:
    device: str
    versions: dict
    model: str
    config: dict
    figures: list[Figure]
    date: str
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. GPU figures skipped without CUDA

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


def step_overhead(on, off, B: int, steps: int, rounds: int, device: str, seed: int,
                  cuda_graphs: bool = False) -> tuple[dict, dict]:
    """Median step times of TTT on vs off, interleaved in `rounds` blocks that cross chunk boundaries.

    `on`/`off` are models (`.lm`); with `cuda_graphs` both run moshi's CUDA graphs (TTT on through
    `TTTLMGen`'s per-phase graphs), else both run eagerly."""
    import contextlib
    from moshi.utils.compile import no_cuda_graph
    from .fastweights.graphs import TTTLMGen

    g = torch.Generator().manual_seed(seed)
    gens = {"on": TTTLMGen(on.lm, use_sampling=False), "off": TTTLMGen(off.lm, use_sampling=False)}
    times: dict[str, list[float]] = {"on": [], "off": []}
    per = max(1, steps // rounds)
    graphs = contextlib.nullcontext() if cuda_graphs else no_cuda_graph()
    with torch.no_grad(), graphs, gens["on"].streaming(B), gens["off"].streaming(B):
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



def selected(only: list[str] | None, variants: list[str]) -> list[str]:
    """The figures to measure, in run order; ConfigError for names `ttt bench` cannot measure.

    Without `only`: every figure of `variants` and the eval figures. With it: exactly the names given
    (a variant's figures may be named whatever `variants` says).
    """
    if not only:
        return measured_names(variants)
    from .bench_gpu import GPU_FIGURES
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    for n in names:
        spec(n)  # unknown names: the registry's message
        if n not in MEASURED and n not in GPU_FIGURES:
            raise ConfigError(f"--only {n}: `ttt bench` does not measure this figure yet. It measures: "
                              f"{', '.join(MEASURED)}.")
    if not names:
        raise ConfigError("--only: give at least one figure name.")
    order = measured_names(variants + [v for v in SUFFIXES if v not in variants]) + list(GPU_FIGURES)
    return [n for n in order if n in names]


def _variant_order(opts: BenchOptions) -> list[str]:
    """The variants to measure: `opts.variants`, or all of them with the model's own first."""
    from .models.config import resolve_ttt_config
    from .models.resolver import resolve

    if opts.variants:
        unknown = [v for v in opts.variants if v not in SUFFIXES]
        if unknown:
            raise ConfigError(f"--variant {', '.join(unknown)}: choose among {', '.join(SUFFIXES)}.")
        return list(dict.fromkeys(opts.variants))
    res = resolve(opts.model)
    own, _ = resolve_ttt_config(res.config, int(res.config.get("num_layers", 32)))
    first = own.variant if own is not None else "inplace"
    return [first] + [v for v in SUFFIXES if v != first]


def run_bench(opts: BenchOptions, progress=None) -> BenchResult:
    """Measures the selected §8 figures on one device and judges them against the registry's targets.

    Every variant asked for is attached to the same base model and measured in turn with its suffix
    (SPEC §5.5); the eval figures are the model's own (as loaded, first variant measured).

    Args:
        opts: model, device, dtype, quick mode, steps, rounds, figure and variant selection, target overrides.
        progress: a `Progress` hook (ttt_cli.progress).
    """
    from .bench_gpu import GPU_FIGURES, SKIP_NOTE, gpu_figures
    from .models.loader import load_model

    progress = progress or NullProgress()
    if opts.steps is not None and opts.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {opts.steps}.")
    variants = _variant_order(opts)
    wanted = selected(opts.only, variants)
    gpu = [n for n in wanted if n in GPU_FIGURES] if opts.only else list(GPU_FIGURES)
    wanted = [n for n in wanted if n not in GPU_FIGURES]
    for name in opts.targets:
        if name not in wanted + gpu:
            raise ConfigError(f"--target {name}: that figure is not measured in this run.")
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    values: dict[str, Figure] = {}
    own = None  # the model the eval figures and the provenance are taken from: the first variant's
    for v in variants + [v for v in SUFFIXES if v not in variants]:
        if set(variant_names(v)) & set(wanted):
            vf, on = variant_figures(opts, v, wanted, progress)
            values.update(vf)
            own = own or on
            del on
    need = {g for g, names in GROUPS.items() if g not in VARIANT_GROUPS and set(names) & set(wanted)}
    if own is None:
        own = load_model(opts.model, device=opts.device, dtype=opts.dtype)
        _require_ttt(own)
    if "score" in need:
        values.update(score_figures(own, opts, progress))
    if need & {"memory", "cache"}:
        values.update(eval_run_figures(own, opts, "memory" in need, "cache" in need, progress))
    if "infer_memory" in need:
        values.update(infer_memory_figures(own, opts, progress))
    if "scaleout" in need:
        from .bench_scaleout import scaleout_figure
        values["scaleout_speedup_2"] = scaleout_figure(own, opts, progress)
    if "telemetry" in need:
        values.update(telemetry_figures(own, opts, progress))
    notes = []
    if gpu and torch.device(own.device).type == "cuda":
        values.update(gpu_figures(own, opts, gpu, progress))
        wanted += gpu
    elif gpu:
        notes.append(SKIP_NOTE.format(names=", ".join(gpu), device=opts.device))
    measured = {n: f.value for n, f in values.items()}
    figs = []
    for name in wanted:
        f = values[name]
        f.target, f.passed = judge(name, f.value, measured, opts.targets)
        if f.error and f.passed is not None:
            f.passed = False
        figs.append(f)
    return BenchResult(device_name(own.device), versions(), own.model_id, own.config.get("ttt") or {}, figs,
                       _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       time.perf_counter() - t_start, notes)


def _require_ttt(m) -> None:
    if not m.ttt or not m.ttt.layers:
        raise ConfigError(f"{m.model_id} has no TTT layers: nothing to measure (pass --ttt-layers to a base model).")


def variant_figures(opts: BenchOptions, variant: str, wanted: list[str], progress) -> tuple[dict[str, Figure], tp.Any]:
    """Step overhead (b1, b8, floor, p99), layer ratio and memory per stream of one variant on `opts.model`.

    TTT off: the same model with its fast weights frozen (rate 0, SPEC §5.5; In-Place's frozen layer is
    moshi's gating kernel on W0), so every variant's overhead is the price of learning.
    Returns the figures (suffixed names) and the TTT-on model.
    """
    from .models.loader import load_model
    from .fastweights.attach import ttt_layers

    sfx = SUFFIXES[variant]
    want = {n for n in PER_VARIANT if n + sfx in wanted}
    overrides = {"variant": variant}
    with warnings.catch_warnings():  # a variant the checkpoint has no tensors for: its fresh init is expected
        warnings.simplefilter("ignore", UserWarning)
        on = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt=overrides)
    _require_ttt(on)
    layers = ttt_layers(on.lm)
    out: dict[str, Figure] = {}
    if want & set(GROUPS["step"]):
        for name, f in step_figures(on, opts, want, variant, progress).items():
            f.name = name + sfx
            f.detail["variant"] = variant
            out[f.name] = f
    if "ttt_layer_ratio" in want:
        progress.start(f"layer{sfx}", f"{variant}: TTT layer vs plain layer, T={LAYER_T}", None)
        first_i, first = next(iter(layers.items()))
        lr = layer_ratio(first, on.device)
        progress.finish(f"layer{sfx}", ratio=lr["ratio"])
        out["ttt_layer_ratio" + sfx] = Figure("ttt_layer_ratio" + sfx, lr["ratio"],
                                              detail={"variant": variant, "layer": first_i, **lr})
    if "memory_per_stream_error" in want:
        predicted = sum(l.state_bytes_per_stream() for l in layers.values())
        measured = sum(measured_bytes_per_stream(l) for l in layers.values())
        err = abs(measured - predicted) / max(predicted, 1)
        out["memory_per_stream_error" + sfx] = Figure("memory_per_stream_error" + sfx, err, detail={
            "variant": variant, "predicted_bytes": predicted, "measured_bytes": measured,
            "formula": " + ".join(l.memory_formula() for l in layers.values()),
            "measured_as": "bytes of the per-stream state tensors (B=2 minus B=1)"})
    return out, on


def step_figures(on, opts: BenchOptions, want: set[str], variant: str, progress) -> dict[str, Figure]:
    """LMGen.step TTT on / off at batch 1 and/or 8, and the batch-8 memory floor (unsuffixed names)."""
    from .models.loader import load_model
    from .fastweights.attach import ttt_layers

    steps = opts.steps or (320 if opts.quick else 1024)  # > chunk_size 256: updates included
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        off = load_model(opts.model, device=opts.device, dtype=opts.dtype,
                         ttt={"variant": variant, "lr": 0.0})
    dev = on.device
    b8 = bool({"step_overhead_b8", "step_overhead_b8_floor"} & want)
    sizes = [B for B, w in ((1, bool({"step_overhead_b1", "step_ms_p99_b1"} & want)), (8, b8)) if w]
    out: dict[str, Figure] = {}
    stats_b: dict[int, dict] = {}
    for B in sizes:
        key = f"step{B}{SUFFIXES[variant]}"
        progress.start(key, f"{variant}: LMGen.step TTT on/off, batch {B}", None)
        stats, _ = step_overhead(on, off, B, steps, opts.rounds, dev, opts.seed)
        stats_b[B] = stats
        ratio = stats["on"]["median_ms"] / stats["off"]["median_ms"]
        progress.finish(key, ratio=ratio)
        out[f"step_overhead_b{B}"] = Figure(f"step_overhead_b{B}", ratio, detail={"on": stats["on"], "off": stats["off"]})
    if 1 in stats_b:
        st = stats_b[1]["on"]
        out["step_ms_p99_b1"] = Figure("step_ms_p99_b1", st["p99_ms"], detail={"median_ms": st["median_ms"],
                                                                               "max_ms": st["max_ms"]})
    if b8:  # batch-8 memory floor: reading 8 streams' fp32 fast state each step, at the measured bandwidth
        bw = memory_bandwidth(dev)
        extra = sum(8 * l.bytes_read_per_step() for l in ttt_layers(on.lm).values())
        floor = 1 + (extra / bw) / (stats_b[8]["off"]["median_ms"] / 1e3)
        out["step_overhead_b8_floor"] = Figure("step_overhead_b8_floor", floor, detail={
            "extra_bytes_per_step": extra, "bandwidth_gb_s": bw / 1e9})
        out["step_overhead_b8"].detail["floor"] = floor
    del off
    return {k: v for k, v in out.items() if k in want or k == "step_overhead_b8_floor" and b8}


def telemetry_figures(own, opts: BenchOptions, progress) -> dict[str, Figure]:
    """LMGen.step of the model with the update series recorded / not recorded, batch 1, interleaved (SPEC §5.5)."""
    from .models.loader import load_model
    from .telemetry import recording

    steps = opts.steps or (320 if opts.quick else 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rec = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt={"variant": own.ttt.variant})
    progress.start("telemetry", f"{own.ttt.variant}: LMGen.step with / without --telemetry, batch 1", None)
    with recording(rec.lm):
        stats, _ = step_overhead(rec, own, 1, steps, opts.rounds, own.device, opts.seed)
    ratio = stats["on"]["median_ms"] / stats["off"]["median_ms"]
    progress.finish("telemetry", ratio=ratio)
    del rec
    return {"telemetry_overhead_b1": Figure("telemetry_overhead_b1", ratio, detail={
        "variant": own.ttt.variant, "with_telemetry": stats["on"], "without": stats["off"]})}


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


def infer_memory_figures(m, opts: BenchOptions, progress) -> dict[str, Figure]:
    """Peak RSS of `ttt infer` (tiny model, dialog: reads the file, writes Moshi's voice) on a long vs a short
    file, each in its own process (SPEC §5.1: memory flat in the recording's length)."""
    # Full: the SPEC pair (60 vs 5 minutes); --quick keeps the 12:1 ratio on 12 vs 1 minutes. 16 kHz input,
    # so the long file goes through the piecewise resampler and the short one through moshi's whole read.
    long_s, short_s = (720.0, 60.0) if opts.quick else (3600.0, 300.0)
    rss, wall = {}, {}
    with tempfile.TemporaryDirectory(prefix="ttt-bench-infer-") as tmp:
        root = Path(tmp)
        for name, secs in (("short", short_s), ("long", long_s)):
            wav = root / f"{name}.wav"
            _write_wav_chunked(wav, secs, seed=2, sr=16000)
            progress.start(f"infer-{name}", f"ttt infer on a {secs / 60:.0f}-minute file (own process)", None)
            t = time.perf_counter()
            rss[name] = _peak_rss_of(["infer", str(wav), "--model", "tiny", "--out", str(root / f"out-{name}"),
                                      "--device", m.device, "--dtype", opts.dtype, "--greedy"])
            wall[name] = time.perf_counter() - t
            progress.finish(f"infer-{name}", peak_rss_mib=rss[name] / 2**20, seconds=wall[name])
            wav.unlink()
    return {"infer_memory_ratio": Figure("infer_memory_ratio", rss["long"] / rss["short"], detail={
        "peak_rss_long_mib": rss["long"] / 2**20, "peak_rss_short_mib": rss["short"] / 2**20,
        "long_seconds": long_s, "short_seconds": short_s, "wall_seconds_long": wall["long"],
        "wall_seconds_short": wall["short"], "model": "tiny", "mode": "dialog"})}
