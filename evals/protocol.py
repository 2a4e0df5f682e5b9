"""`evaluate_librilight`: the long-context perplexity protocol of SPEC §6, with resume; returns an EvalResult."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.units import FRAME_RATE, seconds_to_steps
from ttt_cli.errors import ConfigError
from ttt_cli.progress import NullProgress

from . import report
from .librilight import Dataset, Document, discover
from .policies import Policy, parse_policies
from .scoring import DEFAULT_BLOCK_STEPS

RESULTS_VERSION = 1
STATE_DIR = ".ttt-eval"        # resume state inside --out
STATE_FILE = "state.json"
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

def environment(m) -> dict:
    """Versions, device and date of a run.

    Args:
        m: the loaded TTTModel (its device and dtype).
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
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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
    check_fits(m.lm, s).raise_unless_fits(force)
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


# -- resume state --------------------------------------------------------------------------------

def _state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def _carry_path(out: Path, p: Policy) -> Path:
    return _state_dir(out) / f"carry-{p.dir_name}.safetensors"


def _save_carry(path: Path, carry: dict) -> None:
    from safetensors.torch import save_file
    from ttt_cli.io import atomic_write

    flat = {f"layers.{i}.{k}": v.contiguous() for i, t in carry.items() for k, v in t.items()}
    atomic_write(path, lambda p: save_file(flat, str(p)))


def _load_carry(path: Path) -> dict:
    from safetensors.torch import load_file

    out: dict[int, dict] = {}
    for k, v in load_file(str(path)).items():
        _, i, name = k.split(".", 2)
        out.setdefault(int(i), {})[name] = v
    return out


def _protocol_key(protocol: dict, model: dict) -> str:
    """What must match for `--resume` to continue a run: the numbers-changing options and the model."""
    keep = {k: v for k, v in protocol.items() if k not in ("block_steps", "codes_cache", "save_token_nll")}
    blob = json.dumps({"protocol": keep, "model": {k: model[k] for k in ("id", "fingerprint", "ttt", "dtype")}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _outputs(out: Path) -> list[Path]:
    return [out / report.RESULTS, out / report.CURVE_CSV, out / report.CURVE_PNG, _state_dir(out)]


# -- the run -------------------------------------------------------------------------------------

def _validate(o: EvalOptions) -> None:
    if o.block_steps < 1:
        raise ConfigError(f"--block-steps must be >= 1, got {o.block_steps}.")
    if not o.bin_seconds > 0 or seconds_to_steps(o.bin_seconds) < 1:
        raise ConfigError(f"--bin-seconds must be at least one step (0.08 s), got {o.bin_seconds}.")
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
    d["skipped"] = [{"path": _rel(f["path"], root), "reason": f["reason"]} for f in d["skipped"]]
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
        src = meta.get(f.path)
        if src is not None and src.meta:
            e["meta"] = src.meta
        if src is not None and src.meta_error:
            e["meta_error"] = src.meta_error
        files.append(e)
    skipped = [{"path": rel(s.path), "reason": s.reason} for s in doc.skipped + dc.skipped]
    return {"id": doc.id, "speaker": doc.speaker, "book": doc.book, "title": doc.title(),
            "seconds": dc.seconds, "steps": dc.steps, "files": files, "skipped": skipped,
            "codes_cache_hit": dc.cache_hit}


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
        ConfigError / CheckpointError / StateMismatchError: bad options, data, model or snapshot.
    """
    from ttt_cli.codes import lm_input_codes
    from ttt_cli.io import check_writable_dir, write_json

    from .codes_cache import default_cache_dir, document_codes, mimi_fingerprint
    from .scoring import policy_settings, score_document

    progress = progress or NullProgress()
    o = options
    _validate(o)
    policies = parse_policies(o.policies)
    dataset: Dataset = discover(o.data, o.max_seconds, o.min_seconds, o.limit_books)
    out = Path(o.out)
    check_writable_dir(out)
    sdir = _state_dir(out)
    if o.resume:
        if not (sdir / STATE_FILE).is_file() and (out / report.RESULTS).exists():
            raise ConfigError(f"--resume: {out} has results but no resume state ({STATE_DIR}/{STATE_FILE}); "
                              f"pass --overwrite to run again.")
    elif not o.overwrite:
        existing = [p.name for p in _outputs(out) if p.exists()]
        if existing:
            raise ConfigError(f"{out} already holds the outputs of a run ({', '.join(existing)}); pass --resume to "
                              f"continue it, or --overwrite to replace it.")
    elif sdir.exists():
        shutil.rmtree(sdir)  # --overwrite: forget the old run's resume state

    t_start = time.perf_counter()
    if model is None:
        from ttt_cli import load_model
        model = load_model(o.model, device=o.device, dtype=o.dtype, ttt=o.ttt, base=o.base)
    elif callable(model):
        model = model()
    m = model
    lm = m.lm
    _check_layout(lm, o)
    lr = float(m.ttt.lr) if m.ttt is not None else 0.0
    warnings: list[str] = list(m.warnings)
    warm, init_rec = None, None
    if o.init_state is not None:
        warm, init_rec, notes = load_warm_start(m, Path(o.init_state), o.force_state)
        warnings += notes
    t_fp = time.perf_counter()
    mimi_fp = mimi_fingerprint(m.mimi)  # hashed once per run: part of every codes cache key
    fp_seconds = time.perf_counter() - t_fp
    fp = _ttt_fingerprint(m)
    cache_dir = (Path(o.codes_cache) if o.codes_cache else default_cache_dir()) if o.use_codes_cache else None
    bin_steps = seconds_to_steps(o.bin_seconds)
    protocol = {"policies": [p.name for p in policies], "max_seconds": o.max_seconds, "min_seconds": o.min_seconds,
                "limit_books": o.limit_books, "block_steps": o.block_steps, "bin_seconds": o.bin_seconds,
                "bin_steps": bin_steps, "audio_stream": o.audio_stream, "text_stream": o.text_stream,
                "codes_cache": str(cache_dir) if cache_dir else None, "save_token_nll": o.save_token_nll,
                "init_state": init_rec, "seed": o.seed, "data": str(dataset.root.resolve()),
                "scoring": "teacher forcing in streaming mode; nats per step and codebook"}
    model_rec = _model_section(m, fp, mimi_fp)
    key = _protocol_key(protocol, model_rec)

    # Resume state: finished documents (their records and per-policy sums) in dataset order.
    state = {"version": RESULTS_VERSION, "key": key, "done": [], "docs": {}, "skipped_documents": []}
    if o.resume and (sdir / STATE_FILE).is_file():
        try:
            old = json.loads((sdir / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--resume: cannot read {sdir / STATE_FILE} ({e}); pass --overwrite to start again.") \
                from None
        if old.get("key") != key:
            raise ConfigError(f"--resume: the run in {out} used other options, model or snapshot (policies, "
                              f"cuts, layout, bins, TTT settings); pass the same options, or --overwrite to start "
                              f"again.")
        ids = [d.id for d in dataset.documents]
        done_ids = [d for d in old["done"]]
        if ids[:len(done_ids)] != done_ids:
            raise ConfigError(f"--resume: the dataset changed since the interrupted run (its first documents were "
                              f"{done_ids[:3]}); pass --overwrite to start again.")
        state = old
        progress.log(f"resuming: {len(done_ids)} of {len(ids)} documents already done.")
    elif o.resume:
        progress.log(f"--resume: nothing to resume in {out}; starting a new run.")
    sdir.mkdir(parents=True, exist_ok=True)

    carries: dict[str, dict | None] = {p.name: None for p in policies}
    scored_before = any(state["docs"][d]["record"]["steps"] for d in state["done"])
    for p in policies:
        if p.carries_across_documents and scored_before:
            if not _carry_path(out, p).is_file():
                raise ConfigError(f"--resume: the fast weights that policy {p.name} carries across documents "
                                  f"({_carry_path(out, p)}) are missing; pass --overwrite to start again.")
            carries[p.name] = _load_carry(_carry_path(out, p))

    docs = dataset.documents
    todo = [d for d in docs if d.id not in set(state["done"])]
    est_steps = sum(min(d.seconds, o.max_seconds) for d in todo) * FRAME_RATE * len(policies)
    progress.log(f"scoring {len(todo)} of {len(docs)} document(s) x {len(policies)} policy(ies): "
                 f"{', '.join(p.name for p in policies)}")
    progress.start("eval", "scoring", est_steps)
    interrupted = False
    scored_steps = 0.0
    enc_seconds, hits, misses = 0.0, 0, 0
    written_nll: list[str] = []
    t_loop = time.perf_counter()
    try:
        for n_doc, doc in enumerate(todo, start=len(state["done"]) + 1):
            dc = document_codes(m.mimi, doc, o.max_seconds, cache_dir, str(m.device), mimi_fp=mimi_fp)
            enc_seconds += dc.encode_seconds
            hits, misses = hits + dc.cache_hit, misses + (not dc.cache_hit)
            warnings += dc.warnings
            progress.log(f"[{n_doc}/{len(docs)}] {doc.id}: {dc.seconds:.1f} s, {dc.steps} steps, "
                         f"{'codes cache hit' if dc.cache_hit else 'encoded'} in {dc.encode_seconds:.2f} s"
                         + (f", {len(dc.skipped)} file(s) skipped" if dc.skipped else ""))
            rec = _doc_record(doc, dc, dataset.root)
            entry = {"record": rec, "policies": {}, "telemetry": {}, "encode_seconds": dc.encode_seconds}
            if dc.steps == 0:
                state["skipped_documents"].append({"id": doc.id, "reason": "no file could be decoded",
                                                   "skipped": rec["skipped"]})
            else:
                codes = lm_input_codes(lm, dc.codes, o.audio_stream, o.text_stream)  # [K, T]
                starts = [f.start_step for f in dc.files]
                for p in policies:
                    resets = p.reset_positions(dc.steps, starts)
                    base = scored_steps

                    def on_block(done: int, base=base, p=p) -> None:
                        el = time.perf_counter() - t_loop
                        progress.update("eval", base + done, doc=f"{n_doc}/{len(docs)}", policy=p.name,
                                        steps_per_s=f"{(base + done) / el:.0f}" if el > 0 else "-")

                    with policy_settings(lm, p.ttt_on, lr, warm):
                        sc = score_document(lm, codes, resets, o.block_steps, carry=carries[p.name],
                                            keep_carry=p.carries_across_documents, on_block=on_block)
                    scored_steps += dc.steps
                    acc = Accum()
                    acc.add(sc.nll, sc.text_nll, bin_steps, sc.seconds)
                    entry["policies"][p.name] = acc.to_dict()
                    entry["telemetry"][p.name] = {str(i): t for i, t in sc.telemetry.items()}
                    if p.carries_across_documents:
                        carries[p.name] = sc.carry
                    if o.save_token_nll:
                        path = report.token_nll_path(out, p.dir_name, doc.id)
                        report.write_token_nll(path, sc.nll, codes, {
                            "policy": p.name, "document": doc.id, "resets": resets, "model": m.model_id,
                            "audio_stream": o.audio_stream, "text_stream": o.text_stream,
                            "delays": list(lm.delays), "dep_q": lm.dep_q})
                        written_nll.append(str(path))
            # Commit this document: carries first, then the state that points at them.
            for p in policies:
                if p.carries_across_documents and carries[p.name] is not None:
                    _save_carry(_carry_path(out, p), carries[p.name])
            state["docs"][doc.id] = entry
            state["done"].append(doc.id)
            write_json(sdir / STATE_FILE, state)
    except KeyboardInterrupt:
        interrupted = True
    progress.finish("eval", documents=len(state["done"]), steps_scored=int(scored_steps))

    # Aggregate every finished document (this run's and resumed ones), in dataset order.
    accs = {p.name: Accum() for p in policies}
    tele: dict[str, dict] = {p.name: {} for p in policies}
    documents = []
    failed = [f"{_rel(s.path, dataset.root)}: {s.reason}" for s in dataset.failed_files]
    total_enc = 0.0
    for doc_id in state["done"]:
        e = state["docs"][doc_id]
        failed += [f"{s['path']}: {s['reason']}" for s in e["record"]["skipped"]]
        if not e["record"]["steps"]:
            continue  # listed in skipped_documents
        documents.append(e["record"])
        total_enc += float(e.get("encode_seconds", 0.0))
        for p in policies:
            if p.name in e["policies"]:
                accs[p.name].merge(Accum.from_dict(e["policies"][p.name]))
                _telemetry_add(tele[p.name], {int(i): t for i, t in e["telemetry"][p.name].items()})
    sections = {p.name: _policy_section(p, accs[p.name], bin_steps, tele[p.name], lr, warm is not None)
                for p in policies}
    all_docs = len(docs)
    results = {
        "format_version": RESULTS_VERSION,
        "status": "interrupted" if interrupted else "complete",
        "model": model_rec,
        "dataset": {"path": str(dataset.root.resolve()), "documents": len(documents), "documents_total": all_docs,
                    "files": sum(len(d["files"]) for d in documents),
                    "skipped_files": len(failed),
                    "seconds": sum(d["seconds"] for d in documents), "steps": sum(d["steps"] for d in documents),
                    "skipped_documents": [_skipped_doc(s, dataset.root) for s in dataset.skipped_documents]
                    + state["skipped_documents"],
                    "stray_files": [{"path": _rel(s.path, dataset.root), "reason": s.reason}
                                    for s in dataset.stray_files]},
        "protocol": protocol,
        "policies": sections,
        "timing": {"wall_seconds": time.perf_counter() - t_start, "encode_seconds_this_run": enc_seconds,
                   "mimi_fingerprint_seconds": fp_seconds,
                   "encode_seconds_all_runs": total_enc,
                   "score_seconds": sum(a.seconds for a in accs.values())},
        "codes_cache": {"dir": str(cache_dir) if cache_dir else None, "hits": hits, "misses": misses},
        "fast_weight_bytes_per_stream": _fw_bytes(lm),
        "environment": environment(m),
        "warnings": warnings,
        "documents": documents,
    }
    files = [str(report.write_results(out / report.RESULTS, results)),
             str(report.write_curve_csv(out / report.CURVE_CSV, sections)),
             str(report.write_curve_png(out / report.CURVE_PNG, sections,
                                        f"{m.model_id}: NLL vs position ({len(documents)} document(s), "
                                        f"{o.bin_seconds:g} s bins)"))]
    summaries = [PolicySummary(p.name, s["nll"], s["perplexity"], s["nll_semantic"], s["nll_acoustic"],
                               s["nll_text"], s["tokens"]["all"], s["timing"]["steps_per_second"])
                 for p, s in zip(policies, sections.values())]
    return EvalResult(out, results, summaries, files + written_nll, failed, warnings, interrupted,
                      len(state["done"]), all_docs)


def _fw_bytes(lm) -> int:
    from ttt_cli.fastweights.attach import ttt_layers
    return sum(layer.state_bytes_per_stream() for layer in ttt_layers(lm).values())

