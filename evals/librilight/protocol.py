"""`evaluate_librilight`: the long-context perplexity protocol of SPEC §6, with resume; returns an EvalResult."""

from __future__ import annotations

import datetime
import json
import math
import platform
import shutil
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.audio import FRAME_SIZE, SAMPLE_RATE
from ttt_cli.units import FRAME_RATE, seconds_to_steps
from ttt_cli.errors import ConfigError, TTTError
from ttt_cli.distributed import current
from ttt_cli.progress import NullProgress

from . import report, resume
from .librilight import Dataset, Document, discover
from .policies import Policy, parse_policies
from .scoring import DEFAULT_BLOCK_STEPS

RESULTS_VERSION = 1
AUDIO_STREAMS = ("moshi", "user")
TEXT_STREAMS = ("zero", "pad")
GROUPS = ("all", "semantic", "acoustic", "text")


@dataclass
class EvalOptions:
    """Options of `ttt eval librilight` (the CLI maps its flags one to one)."""

    data: Path
    out: Path
    model: str | None = None
    policies: list[str] = field(default_factory=lambda: ["document"])
    max_seconds: float = 3600.0
    min_seconds: float = 0.0
    limit_books: int | None = None
    block_steps: int = DEFAULT_BLOCK_STEPS
    bin_seconds: float = 60.0
    audio_stream: str = "moshi"
    text_stream: str = "zero"
    codes_cache: Path | None = None   # None: the default under the user cache
    use_codes_cache: bool = True
    save_token_nll: bool = False
    resume: bool = False
    overwrite: bool = False
    init_state: Path | None = None
    force_state: bool = False         # accept a snapshot whose lr/clip differ from the model's
    device: str = "auto"
    dtype: str = "auto"
    ttt: dict | None = None           # overrides of the `ttt` section
    base: str | None = None           # --base of a fine-tuning fork checkpoint (SPEC §4.3)
    seed: int = 0
    telemetry: Path | None = None     # --telemetry: the update series per policy and document (SPEC §3.7)


@dataclass
class PolicySummary:
    """One policy's line of the final table."""

    name: str
    nll: float | None
    perplexity: float | None
    nll_semantic: float | None
    nll_acoustic: float | None
    nll_text: float | None
    tokens: int
    steps_per_second: float | None


@dataclass
class EvalResult:
    """What a run produced: the results.json content, files written, failures and the exit code."""

    out: Path
    results: dict
    policies: list[PolicySummary]
    files: list[str]
    failed: list[str]          # "path: reason" of skipped files and documents
    warnings: list[str]
    interrupted: bool
    documents_done: int
    documents_total: int

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0


# -- accumulation --------------------------------------------------------------------------------

class Accum:
    """Sums of NLL and token counts per position bin, per group (all/semantic/acoustic/text)."""

    def __init__(self, bins: int = 0):
        self.sums = {g: [0.0] * bins for g in GROUPS}
        self.counts = {g: [0] * bins for g in GROUPS}
        self.seconds = 0.0   # scoring wall time
        self.steps = 0
        self.documents = 0

    def _grow(self, n: int) -> None:
        for g in GROUPS:
            self.sums[g] += [0.0] * (n - len(self.sums[g]))
            self.counts[g] += [0] * (n - len(self.counts[g]))

    def add(self, nll, text_nll, bin_steps: int, seconds: float) -> None:
        """Adds one document's NLL [dep_q, T] and text NLL [T]; bins by code step (not delayed position)."""
        import numpy as np

        T = int(nll.shape[-1])
        n_bins = (T + bin_steps - 1) // bin_steps
        self._grow(n_bins)
        a = nll.double().numpy()
        groups = {"all": a, "semantic": a[:1], "acoustic": a[1:], "text": text_nll.double().numpy()[None]}
        bin_of = np.arange(T) // bin_steps
        for g, x in groups.items():
            if x.size == 0:
                continue
            ok = ~np.isnan(x)
            cols = np.broadcast_to(bin_of, x.shape)[ok]
            s = np.bincount(cols, weights=x[ok], minlength=n_bins)
            c = np.bincount(cols, minlength=n_bins)
            for i in range(n_bins):
                self.sums[g][i] += float(s[i])
                self.counts[g][i] += int(c[i])
        self.seconds += seconds
        self.steps += T
        self.documents += 1

    def merge(self, other: "Accum") -> None:
        self._grow(len(other.sums["all"]))
        for g in GROUPS:
            for i, (s, c) in enumerate(zip(other.sums[g], other.counts[g])):
                self.sums[g][i] += s
                self.counts[g][i] += c
        self.seconds += other.seconds
        self.steps += other.steps
        self.documents += other.documents

    def mean(self, g: str, i: int | None = None) -> float | None:
        s = sum(self.sums[g]) if i is None else self.sums[g][i]
        c = sum(self.counts[g]) if i is None else self.counts[g][i]
        return s / c if c else None

    def to_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts, "seconds": self.seconds, "steps": self.steps,
                "documents": self.documents}

    @classmethod
    def from_dict(cls, d: dict) -> "Accum":
        a = cls()
        a.sums, a.counts = {g: list(d["sums"][g]) for g in GROUPS}, {g: list(d["counts"][g]) for g in GROUPS}
        a.seconds, a.steps, a.documents = float(d["seconds"]), int(d["steps"]), int(d["documents"])
        return a


def _ppl(nll: float | None) -> float | None:
    if nll is None:
        return None
    return math.exp(nll) if nll < 700 else math.inf


def _telemetry_add(total: dict, per_layer: dict[int, dict]) -> None:
    for i, t in per_layer.items():
        cur = total.setdefault(str(i), {"updates": 0, "resets": 0, "clip_events": 0, "nonfinite_events": 0,
                                        "max_final_relative_drift": 0.0})
        for k in ("updates", "resets", "clip_events", "nonfinite_events"):
            cur[k] += int(t.get(k, 0))
        cur["max_final_relative_drift"] = max(cur["max_final_relative_drift"], float(t.get("relative_drift", 0.0)))


def _policy_section(p: Policy, acc: Accum, bin_steps: int, telemetry: dict, lr: float, warm: bool) -> dict:
    """results.json's entry of one policy: means, perplexities, token counts, curve, timing, telemetry."""
    curve = []
    for i in range(len(acc.sums["all"])):
        curve.append({"bin_start_s": i * bin_steps / FRAME_RATE, "bin_end_s": (i + 1) * bin_steps / FRAME_RATE,
                      "nll": acc.mean("all", i), "nll_semantic": acc.mean("semantic", i),
                      "nll_acoustic": acc.mean("acoustic", i), "nll_text": acc.mean("text", i),
                      "tokens": acc.counts["all"][i], "tokens_text": acc.counts["text"][i]})
    tokens = {g: sum(acc.counts[g]) for g in GROUPS}
    return {
        "policy": p.name, "description": p.describe(),
        "ttt": {"on": p.ttt_on and lr > 0, "lr": lr if p.ttt_on else 0.0, "warm_start": warm and p.ttt_on},
        "nll": acc.mean("all"), "perplexity": _ppl(acc.mean("all")),
        "nll_semantic": acc.mean("semantic"), "perplexity_semantic": _ppl(acc.mean("semantic")),
        "nll_acoustic": acc.mean("acoustic"), "perplexity_acoustic": _ppl(acc.mean("acoustic")),
        "nll_text": acc.mean("text"), "perplexity_text": _ppl(acc.mean("text")),
        "tokens": tokens, "documents": acc.documents, "steps": acc.steps,
        "timing": {"seconds": acc.seconds, "steps_per_second": acc.steps / acc.seconds if acc.seconds else None,
                   "tokens_per_second": tokens["all"] / acc.seconds if acc.seconds else None},
        "telemetry": telemetry,
        "curve": curve,
    }


# -- provenance ----------------------------------------------------------------------------------

def environment(m, packages: tp.Sequence[str] = ()) -> dict:
    """Versions, device and date of a run.

    Args:
        m: the loaded TTTModel (its device and dtype).
        packages: further packages whose versions the figures depend on (recorded under their names, `-` as `_`).
    """
    import importlib.metadata as md
    import torch
    from ttt_cli import __version__

    def ver(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    dev = str(m.device)
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else (
        platform.processor() or platform.machine())
    return {"ttt": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "moshi": ver("moshi"), "numpy": ver("numpy"), "sphn": ver("sphn"),
            "device": dev, "device_name": name, "dtype": str(m.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **{p.replace("-", "_"): ver(p) for p in packages}}


def _ttt_fingerprint(m) -> str | None:
    from ttt_cli.fastweights.attach import ttt_layers
    if not ttt_layers(m.lm):
        return None
    from ttt_cli.state import fingerprint
    return fingerprint(m.lm)


def _model_section(m, fp: str | None, mimi_fp: str) -> dict:
    lm = m.lm
    return {"id": m.model_id, "model_type": m.info.model_type, "ttt": m.config.get("ttt"),
            "ttt_origin": m.config.get("ttt_origin"), "provenance": m.config.get("provenance"), "fingerprint": fp, "mimi_fingerprint": mimi_fp,
            "num_layers": len(lm.transformer.layers), "dim": lm.dim, "context": lm.context, "n_q": lm.n_q,
            "dep_q": lm.dep_q,
            "delays": list(lm.delays), "card": lm.card, "text_card": lm.text_card,
            "dtype": str(m.dtype).removeprefix("torch."), "device": str(m.device)}


# -- init state (warm start) ---------------------------------------------------------------------

def load_warm_start(m, path: Path, force: bool) -> tuple[dict, dict, list[str]]:
    """Reads an `--init-state` snapshot: ({layer: its captured tensors}, its record for results.json, warnings).

    Args:
        m: the loaded TTTModel the snapshot must fit.
        path: the snapshot file.
        force: accept forceable differences (lr, clip).

    Only the fast weights are used: resets and new streams start from them. A pending partial
    chunk in the snapshot is not replayed (a reset empties the pending chunk by definition), and
    attention tensors, if any, are ignored (a document starts with fresh attention).
    """
    from ttt_cli.state import check_fits, load_state

    s = load_state(path)
    check_fits(m.lm, s).raise_unless_fits(force, flag="--force-state")
    warm, notes = {}, []
    for i in s.layers:
        warm[i] = s.layer_tensors(i)  # FastWeightLayer.set_warm_start takes them as captured
    pending = {str(i): s.pending_tokens(i) for i in s.layers if s.pending_tokens(i)}
    if pending:
        notes.append(f"--init-state {path}: its pending partial chunk ({pending} tokens per layer) is not used; "
                     f"a warm start is the fast weights W only (export with --flush-partial to fold it in).")
    rec = {"path": str(Path(path).resolve()), "sha256": _file_sha256(Path(path)), "model": s.meta.get("model"),
           "model_fingerprint": s.fingerprint, "steps": s.meta.get("steps"), "seconds": s.meta.get("seconds"),
           "source_files": s.meta.get("source_files"), "reset_policy": s.meta.get("reset_policy"),
           "created": s.meta.get("created"), "pending_tokens_ignored": pending,
           "attention_ignored": s.has_attention}
    return warm, rec, notes


def _file_sha256(p: Path) -> str:
    from .codes_cache import file_digest
    return file_digest(p)


# -- outputs and resume state --------------------------------------------------------------------

class EvalStopped(TTTError):
    """The run stopped while its results were being written (Ctrl-C: exit 130, a write failure: exit 1);
    finished documents are kept in the resume record."""


def _outputs(out: Path) -> list[Path]:
    return [out / report.RESULTS, out / report.CURVE_CSV, out / report.CURVE_PNG, resume.state_dir(out),
            resume.ranks_dir(out)]


def _series_paths(o: EvalOptions, policy: Policy, doc_id: str) -> dict[str, Path]:
    """`--telemetry` files of one policy and document: `DIR/<policy dir>/<document id, / as _>.updates.*`."""
    from ttt_cli.telemetry import eval_series_name, series_paths
    return series_paths(Path(o.telemetry), eval_series_name(policy.dir_name, doc_id))


def _output_plan(o: EvalOptions, dataset: Dataset, out: Path, cache_dir: Path | None, policies: list[Policy]):
    """Checks where the run writes before any work (SPEC §7.1); returns (plan, store codes?, notes).

    --out and --codes-cache must lie outside DATA; results.json, curve.csv and curve.png are
    replaced only when an earlier `ttt eval` wrote them (with --overwrite or --resume); an
    unwritable codes cache is used read-only, with a warning.
    """
    from ttt_cli.errors import OutputError
    from ttt_cli.io import check_writable_dir
    from ttt_cli.outputs import OutputPlan, _inside, beside, json_with_keys, real

    plan = OutputPlan(overwrite=True)  # ttt's own earlier outputs: decided below (--resume or --overwrite)
    plan.read(dataset.root, "the dataset (DATA)", tree=True)
    plan.read(o.init_state, "the --init-state snapshot")
    plan.read_model(o.model)
    plan.write_into(out)
    record = json_with_keys("format_version", "protocol", "policies")
    plan.write(out / report.RESULTS, "--out", "results of ttt eval", record)
    for name in (report.CURVE_CSV, report.CURVE_PNG):
        plan.write(out / name, "--out", f"{name} of ttt eval", beside(out / report.RESULTS, record))
    series = []
    if o.telemetry is not None:
        from ttt_cli.telemetry import FLAG, plan_series
        plan.write_into(o.telemetry, FLAG)
        for doc in dataset.documents:
            for p in policies:
                series.append(_series_paths(o, p, doc.id))
                plan_series(plan, series[-1], f"{doc.id} under policy {p.name}")
    plan.check()
    if cache_dir is not None:
        root, c = real(dataset.root), real(cache_dir)
        if c == root or _inside(c, root):
            raise OutputError(f"--codes-cache {cache_dir} is inside the dataset {dataset.root}: cache files would mix "
                              f"with the books. Choose a directory outside it.")
    resume.check_earlier_run(out, o.resume, o.overwrite, _outputs(out) + [f for s in series for f in s.values()])
    plan.prepare()
    store, notes = cache_dir is not None, []
    if cache_dir is not None:
        try:
            check_writable_dir(cache_dir, "--codes-cache")
        except ConfigError as e:
            store = False
            notes.append(f"{e} Entries already there are used; new ones are not stored (--no-codes-cache silences "
                         f"this).")
    return plan, store, notes


def _write_state(sdir: Path, state: dict) -> None:
    from ttt_cli.io import write_text
    # ASCII escapes keep file names that are not UTF-8 exact (surrogate escapes survive a round trip).
    write_text(sdir / resume.STATE_FILE, json.dumps(state, indent=1, ensure_ascii=True) + "\n")


# -- the run -------------------------------------------------------------------------------------

def _validate(o: EvalOptions) -> None:
    if o.block_steps < 1:
        raise ConfigError(f"--block-steps must be >= 1, got {o.block_steps}.")
    if not o.bin_seconds > 0 or seconds_to_steps(o.bin_seconds) < 1:
        raise ConfigError(f"--bin-seconds must be at least one step (0.08 s), got {o.bin_seconds}.")
    if o.max_seconds is not None and 0 < o.max_seconds and int(round(o.max_seconds * SAMPLE_RATE)) < FRAME_SIZE:
        raise ConfigError(f"--max-seconds {o.max_seconds:g} leaves nothing to score: a document needs at least one "
                          f"80 ms frame (--max-seconds 0.08 or more).", hint="give --max-seconds of 0.08 s or more")
    if o.audio_stream not in AUDIO_STREAMS:
        raise ConfigError(f"--audio-stream must be one of {', '.join(AUDIO_STREAMS)}, got {o.audio_stream!r}.")
    if o.text_stream not in TEXT_STREAMS:
        raise ConfigError(f"--text-stream must be one of {', '.join(TEXT_STREAMS)}, got {o.text_stream!r}.")
    if o.resume and o.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                          "overwrite starts it again.")


def _check_layout(lm, o: EvalOptions) -> None:
    audio = lm.dep_q > 0 and o.audio_stream == "moshi"
    text = o.text_stream == "pad"
    if not (audio or text):
        why = ("this checkpoint has no depformer (dep_q = 0), so no audio codebook is predicted"
               if lm.dep_q == 0 else "with --audio-stream user the audio is input only and Moshi's own stream "
                                     "(what the depformer predicts) is empty")
        raise ConfigError(f"nothing to score: {why}, and the text stream is -1 (--text-stream zero). Use "
                          f"--audio-stream moshi on a checkpoint with a depformer, or --text-stream pad to score "
                          f"the text stream.")


def _rel(path: str | Path, root: Path) -> str:
    """A path relative to the dataset root (portable across machines), else as given."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _skipped_doc(s, root: Path) -> dict:
    d = s.to_dict()
    d["skipped"] = [{"path": _rel(f["path"], root), "reason": f["reason"], "failed": f["failed"]}
                    for f in d["skipped"]]
    return d


def _doc_record(doc: Document, dc, root: Path) -> dict:
    def rel(p: str) -> str:
        return _rel(p, root)
    meta = {str(f.path): f for f in doc.files}
    files = []
    for f in dc.files:
        e = {"path": rel(f.path), "start_s": f.start_s, "end_s": f.end_s, "start_step": f.start_step,
             "end_step": f.end_step}
        if f.truncated:
            e["truncated"] = True
        if f.warnings:
            e["warnings"] = list(f.warnings)
        src = meta.get(f.path)
        if src is not None and src.meta:
            e["meta"] = src.meta
        if src is not None and src.meta_error:
            e["meta_error"] = src.meta_error
        files.append(e)
    skipped = [{"path": rel(s.path), "reason": s.reason, "failed": s.failed} for s in doc.skipped + dc.skipped]
    return {"id": doc.id, "speaker": doc.speaker, "book": doc.book, "title": doc.title(),
            "seconds": dc.seconds, "steps": dc.steps, "files": files, "skipped": skipped,
            "codes_cache_hit": dc.cache_hit}


@dataclass
class _Run:
    """What one evaluation holds while it runs (built by `evaluate_librilight`)."""

    o: EvalOptions
    policies: list[Policy]
    dataset: Dataset
    out: Path
    m: tp.Any
    cache_dir: Path | None
    store: bool
    warm: dict | None
    lr: float
    mimi_fp: str
    bin_steps: int
    progress: tp.Any
    state: dict = field(default_factory=dict)
    carries: dict = field(default_factory=dict)
    written_nll: list = field(default_factory=list)
    written_series: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    scored_steps: float = 0.0
    enc_seconds: float = 0.0
    hits: int = 0
    misses: int = 0


def evaluate_librilight(options: EvalOptions, progress=None, model=None) -> EvalResult:
    """Runs the LibriLight long-context protocol (SPEC §6) and writes its outputs into `options.out`.

    Args:
        options: what to run (see EvalOptions).
        progress: a `ttt_cli.progress` hook (None: silent).
        model: a loaded `TTTModel`, or a function returning one, called once the data and --out are
            checked (None: load `options.model`). The model is left as it was found.
    Returns:
        EvalResult; `interrupted` is True when Ctrl-C stopped the run (finished documents are kept,
        `--resume` continues).
    Raises:
        ConfigError / CheckpointError / StateMismatchError / OutputError: bad options, data, model,
            snapshot or output path (before any work).
        WriteError: writing failed part-way (finished documents are kept for --resume).
        EvalStopped: Ctrl-C while the results were being written (exit 130; --resume writes them).
    """
    progress = progress or NullProgress()
    o = options
    _validate(o)
    policies = parse_policies(o.policies)
    from .sharded import refuse_carrying
    refuse_carrying(policies)
    dataset: Dataset = discover(o.data, o.max_seconds, o.min_seconds, o.limit_books)
    out = Path(o.out)
    cache_dir = None
    if o.use_codes_cache:
        from .codes_cache import default_cache_dir
        cache_dir = Path(o.codes_cache) if o.codes_cache else default_cache_dir()
    plan, store, notes = _output_plan(o, dataset, out, cache_dir, policies)
    current().sync("eval-checked")  # under torchrun: no rank writes before every rank checked --out
    try:
        return _evaluate(o, policies, dataset, out, cache_dir, store, notes, progress, model)
    finally:
        plan.cleanup()


def _evaluate(o: EvalOptions, policies: list[Policy], dataset: Dataset, out: Path, cache_dir: Path | None,
              store: bool, notes: list[str], progress, model) -> EvalResult:
    from .codes_cache import mimi_fingerprint

    t_start = time.perf_counter()
    m = obtain_model(o, model)
    _check_layout(m.lm, o)
    lr = float(m.ttt.rate) if m.ttt is not None else 0.0  # the variant's rate (lr, base_lr or lr_scale)
    warm, init_rec = None, None
    run_notes = list(m.warnings) + notes
    if o.init_state is not None:
        warm, init_rec, more = load_warm_start(m, Path(o.init_state), o.force_state)
        run_notes += more
    t_fp = time.perf_counter()
    mimi_fp = mimi_fingerprint(m.mimi)  # hashed once per run: part of every codes cache key
    fp_seconds = time.perf_counter() - t_fp
    bin_steps = seconds_to_steps(o.bin_seconds)
    protocol = {"policies": [p.name for p in policies], "max_seconds": o.max_seconds, "min_seconds": o.min_seconds,
                "limit_books": o.limit_books, "block_steps": o.block_steps, "bin_seconds": o.bin_seconds,
                "bin_steps": bin_steps, "audio_stream": o.audio_stream, "text_stream": o.text_stream,
                "codes_cache": str(cache_dir) if cache_dir else None, "save_token_nll": o.save_token_nll,
                "init_state": init_rec, "seed": o.seed, "data": str(dataset.root.resolve()),
                "scoring": "teacher forcing in streaming mode; nats per step and codebook"}
    model_rec = _model_section(m, _ttt_fingerprint(m), mimi_fp)
    run = _Run(o, policies, dataset, out, m, cache_dir, store, warm, lr, mimi_fp, bin_steps, progress,
               warnings=run_notes)
    config = resume.run_config(protocol, model_rec)
    if current().active:
        from .sharded import score_shared
        interrupted = score_shared(run, config, _open_resume, _score_all, _write_state)
        if not current().is_main:  # rank 0 writes the outputs
            return _rank_result(run, interrupted)
    else:
        _open_resume(run, config)
        interrupted = _score_all(run)
    return _finish(run, protocol, model_rec, interrupted, t_start, fp_seconds)


def obtain_model(o, model):
    """The run's model: `model` itself, what it returns when it is a function, or (None) `o.model` loaded with
    the options' device, dtype, TTT overrides and base."""
    if model is None:
        from ttt_cli import load_model
        return load_model(o.model, device=o.device, dtype=o.dtype, ttt=o.ttt, base=o.base)
    return model() if callable(model) else model


def _open_resume(run: _Run, config: dict) -> None:
    """Loads (and verifies) the resume record, or starts one; written at once, so that a run interrupted
    before its first document finished resumes like any other."""
    o, out, progress = run.o, run.out, run.progress
    sdir = resume.state_dir(out)
    carrying = any(p.carries_across_documents for p in run.policies)
    if o.resume and ((sdir / resume.STATE_FILE).is_file() or resume.ranks_dir(out).is_dir()):
        run.state, notes = resume.open_state(out, config, run.dataset, carrying, _rel)
        run.warnings += notes  # printed once, as warnings, with the results
        progress.log(f"resuming: {len(run.state['done'])} of {len(run.dataset.documents)} documents already done.")
    else:
        if o.resume:
            progress.log(f"--resume: nothing to resume in {out}; starting a new run.")
        if sdir.exists():
            shutil.rmtree(sdir)  # checked to hold only ttt's own resume files (--overwrite)
        resume.remove_ranks(out)  # the same for the records of an earlier run under torchrun
        run.state = resume.new_state(config)
    run.carries = {p.name: None for p in run.policies}
    scored_before = any(run.state["docs"][d]["record"]["steps"] for d in run.state["done"])
    for p in run.policies:
        if p.carries_across_documents and scored_before:
            path = resume.carry_path(out, p.dir_name)
            carry, after = resume.load_carry(path) if path.is_file() else ({}, None)
            if after != run.state["done"][-1]:  # missing, damaged, or from another point of the run
                note = (f"--resume: the fast weights that policy {p.name} carries across documents ({path}) do not "
                        f"follow the last finished document; every document is computed again.")
                run.warnings.append(note)
                run.state = resume.new_state(config)
                run.carries = {q.name: None for q in run.policies}
                break
            run.carries[p.name] = carry
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        _write_state(sdir, run.state)
        resume.remove_ranks(out)  # their documents are in the state file now (checked to be ours)
    except OSError as e:
        _stop_on_write_error(run, e)


def _stop_on_write_error(run: _Run, e: BaseException) -> tp.NoReturn:
    stop_on_write_error(run.out, run.state, [d.id for d in run.dataset.documents], e)


def stop_on_write_error(out: Path, state: dict, ids: list[str], e: BaseException,
                        noun: str = "document") -> tp.NoReturn:
    """Raises the WriteError of a run that could not write (disk full, permission...): what is kept, what was
    not run, how to resume (finished items stay in the resume record; an empty record is removed).

    Args:
        out: --out.
        state: the resume state (its `done` items are kept).
        ids: every item of the run, in order.
        e: the error met.
        noun: what an item is called (`document`, `recording`).
    """
    from ttt_cli.errors import WriteError
    from ttt_cli.io import as_os_error, describe_os_error

    ose = as_os_error(e) or OSError(str(e))
    done = list(state.get("done", []))
    left = [i for i in ids if i not in set(done)]
    if not done:
        _remove_empty_state(out)
    err = WriteError(f"{describe_os_error(ose, ose.filename)}. {len(done)} finished {noun}(s) are kept"
                     + (f" in {resume.state_dir(out)}" if done else "")
                     + f"; {len(left)} {noun}(s) not run. Free some space (or fix the path) and run the same "
                       f"command with --resume.", hint="free some space, then run the same command with --resume")
    err.payload = {f"{noun}s_done": done, f"{noun}s_not_run": left}  # type: ignore[attr-defined]
    raise err from None


def _remove_empty_state(out: Path) -> None:
    sdir = resume.state_dir(out)
    try:
        if sdir.is_dir() and resume.state_dir_is_ours(sdir) and not any(
                p.name != resume.STATE_FILE for p in sdir.iterdir()):
            shutil.rmtree(sdir)
    except OSError:
        pass


def _commit(run: _Run, doc: Document, entry: dict) -> None:
    """Commits one finished document to the resume record: carries first (they name it), then the record;
    it counts once written."""
    for p in run.policies:
        if p.carries_across_documents and run.carries[p.name] is not None:
            resume.save_carry(resume.carry_path(run.out, p.dir_name), run.carries[p.name], doc.id)
    state = resume.with_document(run.state, doc.id, entry)
    _write_state(resume.state_dir(run.out), state)
    run.state = state


def _estimated_steps(run: _Run, docs: list[Document]) -> float:
    return sum(min(d.seconds, run.o.max_seconds) for d in docs) * FRAME_RATE * len(run.policies)


def _score_all(run: _Run, todo: list[Document] | None = None, commit=_commit) -> bool:
    """Scores the documents `todo` (default: every one not done yet), handing each finished one to
    `commit(run, doc, entry)`; True when Ctrl-C stopped it."""
    docs = run.dataset.documents
    done = set(run.state["done"])
    first, of = (len(done) + 1, len(docs)) if todo is None else (1, len(todo))  # torchrun: this rank's share
    todo = [d for d in docs if d.id not in done] if todo is None else todo
    est_steps = _estimated_steps(run, todo)
    run.progress.log(f"scoring {len(todo)} of {len(docs)} document(s) x {len(run.policies)} policy(ies): "
                     f"{', '.join(p.name for p in run.policies)}")
    run.progress.start("eval", "scoring", est_steps)
    t_loop = time.perf_counter()
    interrupted = False
    try:
        for n_doc, doc in enumerate(todo, start=first):
            entry = _score_document(run, doc, f"{n_doc}/{of}", t_loop)
            commit(run, doc, entry)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        from ttt_cli.io import as_os_error
        if isinstance(e, TTTError) or as_os_error(e) is None:
            raise
        _stop_on_write_error(run, e)
    run.progress.finish("eval", documents=len(run.state["done"]), steps_scored=int(run.scored_steps))
    return interrupted


def _score_document(run: _Run, doc: Document, label: str, t_loop: float) -> dict:
    """Encodes (or finds cached) one document and scores it under every policy; returns its resume entry."""
    from ttt_cli.codes import lm_input_codes
    from .codes_cache import document_codes
    from .scoring import policy_settings, score_document

    o, m, lm = run.o, run.m, run.m.lm
    dc = document_codes(m.mimi, doc, o.max_seconds, run.cache_dir, str(m.device), mimi_fp=run.mimi_fp,
                        store=run.store)
    run.enc_seconds += dc.encode_seconds
    run.hits, run.misses = run.hits + dc.cache_hit, run.misses + (not dc.cache_hit)
    run.warnings += dc.warnings
    run.progress.log(f"[{label}] {doc.id}: {dc.seconds:.1f} s, {dc.steps} steps, "
                     f"{'codes cache hit' if dc.cache_hit else 'encoded'} in {dc.encode_seconds:.2f} s"
                     + (f", {len(dc.skipped)} file(s) skipped" if dc.skipped else ""))
    rec = _doc_record(doc, dc, run.dataset.root)
    entry = {"record": rec, "policies": {}, "telemetry": {}, "encode_seconds": dc.encode_seconds,
             "inputs": resume.document_inputs(doc, dc, run.dataset.root, _rel), "warnings": list(dc.warnings)}
    if dc.steps == 0:
        entry["skipped_document"] = {"id": doc.id, "reason": "no file could be decoded", "skipped": rec["skipped"]}
        return entry
    codes = lm_input_codes(lm, dc.codes, o.audio_stream, o.text_stream)  # [K, T]
    starts = [f.start_step for f in dc.files]
    for p in run.policies:
        resets = p.reset_positions(dc.steps, starts)
        base = run.scored_steps

        def on_block(done: int, base=base, p=p) -> None:
            el = time.perf_counter() - t_loop
            run.progress.update("eval", base + done, doc=label, policy=p.name,
                                steps_per_s=f"{(base + done) / el:.0f}" if el > 0 else "-")

        with policy_settings(lm, p.ttt_on, run.lr, run.warm):
            sc = score_document(lm, codes, resets, o.block_steps, carry=run.carries[p.name],
                                keep_carry=p.carries_across_documents, on_block=on_block,
                                record=o.telemetry is not None)
        run.scored_steps += dc.steps
        acc = Accum()
        acc.add(sc.nll, sc.text_nll, run.bin_steps, sc.seconds)
        entry["policies"][p.name] = acc.to_dict()
        entry["telemetry"][p.name] = {str(i): t for i, t in sc.telemetry.items()}
        if p.carries_across_documents:
            run.carries[p.name] = sc.carry
        if o.telemetry is not None:
            from ttt_cli.telemetry import write_series
            files = write_series(_series_paths(o, p, doc.id), sc.updates or {}, 0,
                                 f"{m.model_id}: {doc.id}, policy {p.name}")
            entry.setdefault("update_series", {})[p.name] = files
            run.written_series += list(files.values())
        if o.save_token_nll:
            path = report.token_nll_path(run.out, p.dir_name, doc.id)
            report.write_token_nll(path, sc.nll, codes, {
                "policy": p.name, "document": doc.id, "resets": resets, "model": m.model_id,
                "audio_stream": o.audio_stream, "text_stream": o.text_stream,
                "delays": list(lm.delays), "dep_q": lm.dep_q})
            run.written_nll.append(str(path))
    return entry


def _finish(run: _Run, protocol: dict, model_rec: dict, interrupted: bool, t_start: float,
            fp_seconds: float) -> EvalResult:
    """Aggregates every finished document (this run's and resumed ones) and writes the outputs."""
    from ttt_cli.fastweights.attach import state_bytes_per_stream

    policies, dataset, state = run.policies, run.dataset, run.state
    accs = {p.name: Accum() for p in policies}
    tele: dict[str, dict] = {p.name: {} for p in policies}
    series: dict[str, dict] = {p.name: {} for p in policies}
    documents, skipped_docs = [], []
    failed = [f"{_rel(s.path, dataset.root)}: {s.reason}" for s in dataset.failed_files]
    total_enc = 0.0
    warnings = list(run.warnings)
    for doc_id in state["done"]:
        e = state["docs"][doc_id]
        failed += [f"{s['path']}: {s['reason']}" for s in e["record"]["skipped"] if s.get("failed", True)]
        warnings += [w for w in e.get("warnings", []) if w not in warnings]
        if not e["record"]["steps"]:
            skipped_docs.append(e.get("skipped_document") or {"id": doc_id, "reason": "no file could be decoded",
                                                              "skipped": e["record"]["skipped"]})
            continue
        documents.append(e["record"])
        total_enc += float(e.get("encode_seconds", 0.0))
        for p in policies:
            if p.name in e["policies"]:
                accs[p.name].merge(Accum.from_dict(e["policies"][p.name]))
                _telemetry_add(tele[p.name], {int(i): t for i, t in e["telemetry"][p.name].items()})
            if p.name in e.get("update_series", {}):
                series[p.name][doc_id] = e["update_series"][p.name]
    sections = {p.name: _policy_section(p, accs[p.name], run.bin_steps, tele[p.name], run.lr, run.warm is not None)
                for p in policies}
    excluded = sum(1 for d in documents for s in d["skipped"] if not s.get("failed", True)) + sum(
        1 for s in dataset.skipped_documents for f in s.files if not f.failed)
    results = {
        "format_version": RESULTS_VERSION,
        "status": "interrupted" if interrupted else "complete",
        "model": model_rec,
        "dataset": {"path": str(dataset.root.resolve()), "documents": len(documents),
                    "documents_total": len(dataset.documents),
                    "files": sum(len(d["files"]) for d in documents),
                    "skipped_files": len(failed), "excluded_files": excluded,
                    "seconds": sum(d["seconds"] for d in documents), "steps": sum(d["steps"] for d in documents),
                    "skipped_documents": [_skipped_doc(s, dataset.root) for s in dataset.skipped_documents]
                    + skipped_docs,
                    "stray_files": [{"path": _rel(s.path, dataset.root), "reason": s.reason}
                                    for s in dataset.stray_files]},
        "protocol": protocol,
        "policies": sections,
        "timing": {"wall_seconds": time.perf_counter() - t_start, "encode_seconds_this_run": run.enc_seconds,
                   "mimi_fingerprint_seconds": fp_seconds,
                   "encode_seconds_all_runs": total_enc,
                   "score_seconds": sum(a.seconds for a in accs.values())},
        "codes_cache": {"dir": str(run.cache_dir) if run.cache_dir else None, "hits": run.hits,
                        "misses": run.misses, "read_only": run.cache_dir is not None and not run.store},
        "fast_weight_bytes_per_stream": state_bytes_per_stream(run.m.lm),
        "update_series": {"dir": None if run.o.telemetry is None else str(run.o.telemetry), "files": series},
        "environment": environment(run.m),
        "warnings": warnings,
        "distributed": _distributed_record(state["done"]),
        "documents": documents,
    }
    files = _write_outputs(run, results, sections, len(documents))
    summaries = [PolicySummary(p.name, s["nll"], s["perplexity"], s["nll_semantic"], s["nll_acoustic"],
                               s["nll_text"], s["tokens"]["all"], s["timing"]["steps_per_second"])
                 for p, s in zip(policies, sections.values())]
    return EvalResult(run.out, results, summaries, files + run.written_nll + run.written_series, failed, warnings,
                      interrupted,
                      len(state["done"]), len(dataset.documents))


def _distributed_record(done: list[str]) -> dict:
    """SPEC §5.6 provenance: world size, backend and each rank's documents (one share without torchrun)."""
    s = current()
    return s.record() if s.active else {"world_size": 1, "backend": None, "shares": {"0": list(done)}}


def _rank_result(run: _Run, interrupted: bool) -> EvalResult:
    """What a rank other than 0 reports (its own share; rank 0 writes and reports the job's results)."""
    failed = [f"{s['path']}: {s['reason']}" for d in run.state["done"] for s in run.state["docs"][d]["record"]["skipped"]
              if s.get("failed", True)]
    return EvalResult(run.out, {}, [], [], failed, run.warnings, interrupted, len(run.state["done"]),
                      len(run.dataset.documents))


def _write_outputs(run: _Run, results: dict, sections: dict, n_docs: int) -> list[str]:
    """results.json, curve.csv, curve.png, each atomic; Ctrl-C or a write failure here keeps the record."""
    out = run.out
    writers = [lambda: report.write_results(out / report.RESULTS, results),
               lambda: report.write_curve_csv(out / report.CURVE_CSV, sections),
               lambda: report.write_curve_png(out / report.CURVE_PNG, sections,
                                              f"{run.m.model_id}: NLL vs position ({n_docs} document(s), "
                                              f"{run.o.bin_seconds:g} s bins)")]
    return write_results_or_stop(out, run.state, [d.id for d in run.dataset.documents], writers,
                                 "results.json, curve.csv and curve.png")


def write_results_or_stop(out: Path, state: dict, ids: list[str], writers: list[tp.Callable[[], Path]],
                          names: str, noun: str = "document") -> list[str]:
    """Runs `writers` (each writes one output atomically, returning its path); Ctrl-C raises EvalStopped (exit
    130) and a write failure `stop_on_write_error`'s WriteError, the resume record kept either way.

    Args:
        out: --out.
        state: the resume state.
        ids: every item of the run, in order.
        writers: the output writers.
        names: the outputs, as the message names them.
        noun: what an item is called (`document`, `recording`).
    """
    try:
        return [str(w()) for w in writers]
    except KeyboardInterrupt:
        done = len(state["done"])
        e = EvalStopped(f"interrupted while writing the results: the {done} finished {noun}(s) are kept in "
                        f"{resume.state_dir(out)}. Run the same command with --resume to write {names}.",
                        hint="run the same command with --resume")
        e.exit_code = 130
        e.payload = {f"{noun}s_done": state["done"]}  # type: ignore[attr-defined]
        raise e from None
    except Exception as e:
        from ttt_cli.io import as_os_error
        if as_os_error(e) is None:
            raise
        stop_on_write_error(out, state, ids, e, noun)
