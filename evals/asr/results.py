"""results.json of `ttt eval asr` from the committed recordings, and its writers (SPEC §5.7, docs/asr.md)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ttt_cli.fastweights.attach import state_bytes_per_stream
from ttt_cli.outputs import InputLedger

from ..inputs import rel_path
from ..intervals import Bootstrap, UnitScores, policy_intervals, ratio_interval
from ..policies import Policy
from ..report import RESULTS, with_intervals, write_results
from ..run import EvalResult, environment as run_environment, telemetry_add, write_results_or_stop
from ..sharding import distributed_record
from .data import AsrItem
from .metrics import FileScore, score_corpus, score_file
from .options import AsrRun
from .report import WER_CSV, WER_PNG, write_wer_csv, write_wer_png

RESULTS_VERSION = 1
COUNTS = ("substitutions", "deletions", "insertions", "hits", "words", "chars", "char_errors")
RATES = ("wer", "wer_mean", "cer", "cer_mean", "longest_deletion_run", "longest_gap_s", "repetition_rate")


@dataclass
class PolicyWer:
    """One policy's line of the final table (None: no recording scored)."""

    name: str
    wer: float | None
    wer_mean: float | None
    cer: float | None
    substitutions: int
    deletions: int
    insertions: int
    words: int
    longest_deletion_run: int | None
    longest_gap_s: float | None
    repetition_rate: float | None
    realtime_factor: float | None
    ci: list[float] | None = None          # 95% interval of `wer` (None: see results.json's bootstrap note)
    vs_off: dict | None = None             # {"diff", "ci"} of wer − off's wer (None: off itself, or no off)


def describe(p: Policy) -> str:
    """What a policy does to a recording's stream.

    Args:
        p: the policy.
    """
    if p.kind == "document":
        return "fast weights reset at each recording's start (each recording is its own stream)"
    if p.kind == "every":
        return (f"fast weights reset at each recording's start and before every {p.interval_steps}th step of its "
                f"stream (attention carries on)")
    return p.describe()


def _corpus(scores: list[FileScore]) -> dict:
    """A policy's corpus figures; counts 0 and rates None when no recording was scored."""
    if scores:
        d = score_corpus(scores).to_dict()
    else:
        d = {**{k: 0 for k in COUNTS}, **{k: None for k in RATES}, "files": 0, "bins": []}
    d["recordings"] = d.pop("files")  # `files` is the per-file list (SPEC §5.7)
    return d


class _PolicyAcc:
    """One policy's scores, per-file entries, timing and telemetry, over the committed recordings."""

    def __init__(self):
        self.scores: list[FileScore] = []
        self.files: list[dict] = []
        self.wall = self.audio = 0.0
        self.steps = 0
        self.telemetry: dict = {}

    def add(self, key: str, reference: str, hyp: dict, score: FileScore, entry: dict) -> None:
        self.scores.append(score)
        self.files.append({"path": key, "reference": reference, "hypothesis": hyp["text"], **score.to_dict()})
        self.wall += float(entry["wall_seconds"])
        self.audio += float(entry["seconds"])
        self.steps += int(entry["steps"])
        telemetry_add(self.telemetry, {int(i): t for i, t in entry["telemetry"].items()})

    def section(self, p: Policy, lr: float, warm: bool) -> dict:
        return {"policy": p.name, "description": describe(p),
                "ttt": {"on": p.ttt_on and lr > 0, "lr": lr if p.ttt_on else 0.0, "warm_start": warm and p.ttt_on,
                        "reset_every_steps": p.interval_steps if p.kind == "every" else None},
                **_corpus(self.scores),
                "timing": {"wall_seconds": self.wall, "audio_seconds": self.audio, "steps": self.steps,
                           "realtime_factor": self.wall / self.audio if self.audio else None,
                           "ms_per_step": 1000 * self.wall / self.steps if self.steps else None},
                "telemetry": self.telemetry, "files": self.files}


def _read_hypothesis(out: Path, rel: str) -> dict:
    obj = json.loads((out / rel).read_text(encoding="utf-8"))
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not isinstance(obj.get("words"), list):
        raise OSError(f"{out / rel} is not a hypothesis record of ttt eval asr (no text or words).")
    return obj


def _recording(item: AsrItem, e: dict) -> dict:
    return {"key": item.key, "audio": str(item.audio),
            "reference_path": str(item.reference_path) if item.reference_path else None,
            "manifest_line": item.line, "seconds": e["info"]["seconds"], "input": e["info"],
            "hypotheses": {name: {"txt": pe["txt"], "json": pe["json"]} for name, pe in e["policies"].items()},
            "warnings": e.get("warnings", [])}


def build_results(run: AsrRun, interrupted: bool) -> tuple[dict, InputLedger, list[PolicyWer]]:
    """(results.json content, the InputLedger of every input, the policies' table lines) of a run.

    Every committed recording is scored again from its hypothesis files against its reference as read
    now, with this run's --bin-seconds, so that resumed and new recordings are scored alike.

    Args:
        run: the run (its state holds every committed recording).
        interrupted: Ctrl-C stopped the transcription.
    """
    ds, o = run.dataset, run.o
    ledger = _ledger(run)
    accs = {p.name: _PolicyAcc() for p in run.policies}
    recordings, warnings = [], list(run.warnings)
    done = set(run.state["done"])
    for it in ds.items:
        e = run.state["docs"].get(it.key) if it.key in done else None
        if e is None:
            continue
        if e.get("error"):
            ledger.skip(it.key, e["error"])
            continue
        ledger.done(it.key, e.get("warnings", []))
        warnings += [w for w in e.get("warnings", []) if w not in warnings]
        recordings.append(_recording(it, e))
        for p in run.policies:
            pe = e["policies"][p.name]
            hyp = _read_hypothesis(run.out, pe["json"])
            score = score_file(it.reference, hyp["text"], hyp["words"], e["info"]["seconds"], o.bin_seconds)
            accs[p.name].add(it.key, it.reference, hyp, score, pe)
    if interrupted:
        ledger.not_run("interrupted (Ctrl-C)")
    sections = {p.name: accs[p.name].section(p, run.lr, run.warm is not None) for p in run.policies}
    boot = Bootstrap(o.bootstrap, o.seed, "recording")
    sections = add_intervals(sections, {name: a.scores for name, a in accs.items()}, boot)
    for i, rec in enumerate(recordings):
        rec["scores"] = {name: unit_record(a.scores[i]) for name, a in accs.items()}
    results = {
        "format_version": RESULTS_VERSION, "kind": "asr",
        "status": "interrupted" if interrupted else "complete",
        "model": run.model_rec,
        "dataset": {"path": str(Path(ds.source).resolve()), "kind": ds.kind, "manifest_format": ds.manifest_format,
                    "recordings": len(recordings),
                    "recordings_total": len(ds.items), "seconds": sum(r["seconds"] for r in recordings),
                    "skipped": [{"path": r.path, "reason": r.reason, "failed": r.failed} for r in ledger.skipped]},
        "protocol": run.protocol,
        "policies": sections,
        "bootstrap": boot.record(len(recordings)),
        "recordings": recordings,
        "timing": {"wall_seconds": time.perf_counter() - run.t_start,
                   "transcribe_seconds": sum(a.wall for a in accs.values())},
        "fast_weight_bytes_per_stream": state_bytes_per_stream(run.m.lm),
        "environment": environment(run.m),
        "warnings": warnings,
        "inputs": ledger.to_dict(),
        "distributed": distributed_record(run.state["done"]),
    }
    return results, ledger, [_summary(name, s) for name, s in sections.items()]


def add_intervals(sections: dict[str, dict], scores: dict[str, list[FileScore]], boot: Bootstrap) -> dict[str, dict]:
    """The sections with their 95% intervals (SPEC §5.8): `ci` and `vs_off` of the corpus WER overall and per
    bin, resampling recordings' (errors, words) pairs, and `wer_mean_ci` of the mean of per-file WERs.

    Args:
        sections: results.json's `policies`.
        scores: policy -> its recordings' scores, the same recording at the same index for every policy.
        boot: resamples, seed.
    """
    units = {name: [UnitScores((f.errors, f.words), None if f.bins is None else
                               [(b.errors, b.ref_words) for b in f.bins]) for f in files]
             for name, files in scores.items()}
    out = with_intervals(sections, policy_intervals(units, boot), "wer", "bins")
    for name, s in out.items():
        mean_ci = ratio_interval([(f.wer, 1.0) for f in scores[name]], boot)  # a mean: Σ wer_i / Σ 1
        out[name] = {}
        for k, v in s.items():
            out[name][k] = v
            if k == "wer_mean":
                out[name]["wer_mean_ci"] = mean_ci
    return out


def unit_record(f: FileScore) -> dict:
    """A recording's sums under one policy in results.json's `recordings[].scores`, what the intervals resample.

    Args:
        f: its score.
    """
    return {"errors": f.errors, "words": f.words,
            "bins": None if f.bins is None else {"errors": [b.errors for b in f.bins],
                                                 "ref_words": [b.ref_words for b in f.bins]}}


def _ledger(run: AsrRun) -> InputLedger:
    """Every input of the run: each recording, and each file discovery left out (with why)."""
    ds = run.dataset
    ledger = InputLedger()
    for it in ds.items:
        ledger.add(it.key, it.key)
    for s in ds.skipped:
        ledger.add(("skipped", s.path), rel_path(s.path, ds.root))
        ledger.skip(("skipped", s.path), s.reason, s.failed)
    return ledger


def _summary(name: str, s: dict) -> PolicyWer:
    return PolicyWer(name, s["wer"], s["wer_mean"], s["cer"], s["substitutions"], s["deletions"], s["insertions"],
                     s["words"], s["longest_deletion_run"], s["longest_gap_s"], s["repetition_rate"],
                     s["timing"]["realtime_factor"], s["ci"], s["vs_off"])


def environment(m) -> dict:
    """The driver's environment record plus the scoring packages' versions (WERs depend on them).

    Args:
        m: the loaded TTTModel.
    """
    return run_environment(m, ("jiwer", "whisper-normalizer"))


def write_outputs(run: AsrRun, results: dict) -> list[str]:
    """results.json, wer.csv and wer.png, each atomic and read back; Ctrl-C or a write failure here keeps the
    resume record (`evals.run.write_results_or_stop`).

    Args:
        run: the run.
        results: results.json's content.
    """
    out = run.out
    bins = {name: s["bins"] for name, s in results["policies"].items()}
    overall = {name: s["wer"] for name, s in results["policies"].items() if s["wer"] is not None}
    n = results["dataset"]["recordings"]
    title = (f"{run.m.model_id} ({run.mode}): WER vs position ({n} recording(s), {run.o.bin_seconds:g} s bins)")
    writers = [lambda: write_results(out / RESULTS, results),
               lambda: write_wer_csv(out / WER_CSV, bins),
               lambda: write_wer_png(out / WER_PNG, bins, title, overall)]
    return write_results_or_stop(out, run.state, [it.key for it in run.dataset.items], writers,
                                 "results.json, wer.csv and wer.png", "recording")


def merge(run: AsrRun, interrupted: bool) -> EvalResult:
    """Scores every committed recording against its current reference, sums per policy, writes the outputs.

    Args:
        run: the run.
        interrupted: Ctrl-C stopped the transcription.
    Returns:
        EvalResult (`policies`: PolicyWer lines; `documents_done`/`_total` count recordings).
    """
    results, ledger, summaries = build_results(run, interrupted)
    files = write_outputs(run, results)
    failed = [f"{r.path}: {r.reason}" for r in ledger.failed]
    return EvalResult(run.out, results, summaries, files, failed, results["warnings"], interrupted,
                      len(run.state["done"]), len(run.dataset.items))
