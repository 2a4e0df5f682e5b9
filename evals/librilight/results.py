"""results.json of `ttt eval librilight` from every finished document, its table lines, and its writers (SPEC §6)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ttt_cli import timeline
from ttt_cli.fastweights.attach import state_bytes_per_stream

from ..inputs import rel_path
from ..intervals import Bootstrap, UnitScores, policy_intervals
from ..report import RESULTS, with_intervals, write_results
from ..run import EvalResult, Setup, environment, telemetry_add, write_results_or_stop
from ..sharding import distributed_record
from . import report  # write_curve_png called through its module: a test stands in for it
from .accum import Accum, policy_section
from .options import LibriLightRun
from .records import skipped_doc

RESULTS_VERSION = 1


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
    ci: list[float] | None = None          # 95% interval of `nll` (None: see results.json's bootstrap note)
    vs_off: dict | None = None             # {"diff", "ci"} of nll − off's nll (None: off itself, or no off)


@dataclass
class Finished:
    """What the finished documents (this run's and resumed ones) add up to, per policy."""

    accs: dict[str, Accum]
    telemetry: dict[str, dict]
    series: dict[str, dict]                 # policy -> {document id: its update-series files}
    documents: list[dict] = field(default_factory=list)
    skipped_docs: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    encode_seconds: float = 0.0


def gather(run: LibriLightRun) -> Finished:
    """Sums every finished document of the resume state per policy, and collects its records and problems.

    Args:
        run: the run (its state holds every finished document).
    """
    policies, dataset, state = run.policies, run.dataset, run.state
    f = Finished({p.name: Accum() for p in policies}, {p.name: {} for p in policies}, {p.name: {} for p in policies},
                 failed=[f"{rel_path(s.path, dataset.root)}: {s.reason}" for s in dataset.failed_files],
                 warnings=list(run.warnings))
    for doc_id in state["done"]:
        e = state["docs"][doc_id]
        f.failed += [f"{s['path']}: {s['reason']}" for s in e["record"]["skipped"] if s.get("failed", True)]
        f.warnings += [w for w in e.get("warnings", []) if w not in f.warnings]
        if not e["record"]["steps"]:
            f.skipped_docs.append(e.get("skipped_document") or {"id": doc_id, "reason": "no file could be decoded",
                                                                "skipped": e["record"]["skipped"]})
            continue
        f.documents.append(e["record"])
        f.encode_seconds += float(e.get("encode_seconds", 0.0))
        for p in policies:
            if p.name in e["policies"]:
                f.accs[p.name].merge(Accum.from_dict(e["policies"][p.name]))
                telemetry_add(f.telemetry[p.name], {int(i): t for i, t in e["telemetry"][p.name].items()})
            if p.name in e.get("update_series", {}):
                f.series[p.name][doc_id] = e["update_series"][p.name]
    return f


def dataset_section(run: LibriLightRun, f: Finished) -> dict:
    """results.json's `dataset` section: what was scored, and every book and file left out.

    Args:
        run: the run.
        f: the finished documents.
    """
    dataset, documents = run.dataset, f.documents
    excluded = sum(1 for d in documents for s in d["skipped"] if not s.get("failed", True)) + sum(
        1 for s in dataset.skipped_documents for x in s.files if not x.failed)
    return {"path": str(dataset.root.resolve()), "documents": len(documents),
            "documents_total": len(dataset.documents),
            "files": sum(len(d["files"]) for d in documents),
            "skipped_files": len(f.failed), "excluded_files": excluded,
            "seconds": sum(d["seconds"] for d in documents), "steps": sum(d["steps"] for d in documents),
            "skipped_documents": [skipped_doc(s, dataset.root) for s in dataset.skipped_documents]
            + f.skipped_docs,
            "stray_files": [{"path": rel_path(s.path, dataset.root), "reason": s.reason}
                            for s in dataset.stray_files]}


def finish(run: LibriLightRun, setup: Setup, interrupted: bool) -> EvalResult:
    """Aggregates every finished document (this run's and resumed ones) and writes the outputs.

    Args:
        run: the run.
        setup: what the driver recorded (protocol, model section, start time, Mimi hashing time).
        interrupted: Ctrl-C stopped the scoring.
    """
    policies, state = run.policies, run.state
    timeline.mark("merged")
    f = gather(run)
    sections = {p.name: policy_section(p, f.accs[p.name], run.bin_steps, f.telemetry[p.name], run.lr,
                                       run.warm is not None) for p in policies}
    boot = Bootstrap(run.o.bootstrap, run.o.seed, "document")
    documents, scores = unit_scores(run, f.documents)
    sections = with_intervals(sections, policy_intervals(scores, boot), "nll", "curve")
    results = {
        "format_version": RESULTS_VERSION,
        "status": "interrupted" if interrupted else "complete",
        "model": setup.model_rec,
        "dataset": dataset_section(run, f),
        "protocol": setup.protocol,
        "policies": sections,
        "timing": {"wall_seconds": time.perf_counter() - setup.t_start, "encode_seconds_this_run": run.enc_seconds,
                   "mimi_fingerprint_seconds": setup.fp_seconds,
                   "encode_seconds_all_runs": f.encode_seconds,
                   "score_seconds": sum(a.seconds for a in f.accs.values()),
                   "ranks": {"0": timeline.points(), **run.rank_points}},
        "codes_cache": {"dir": str(run.cache_dir) if run.cache_dir else None, "hits": run.hits,
                        "misses": run.misses, "read_only": run.cache_dir is not None and not run.store},
        "fast_weight_bytes_per_stream": state_bytes_per_stream(run.m.lm),
        "update_series": {"dir": None if run.o.telemetry is None else str(run.o.telemetry), "files": f.series},
        "environment": environment(run.m),
        "warnings": f.warnings,
        "distributed": distributed_record(state["done"]),
        "bootstrap": boot.record(len(documents)),
        "documents": documents,
    }
    files = write_outputs(run, results, sections, len(f.documents))
    summaries = [PolicySummary(p.name, s["nll"], s["perplexity"], s["nll_semantic"], s["nll_acoustic"],
                               s["nll_text"], s["tokens"]["all"], s["timing"]["steps_per_second"], s["ci"],
                               s["vs_off"]) for p, s in zip(policies, sections.values())]
    return EvalResult(run.out, results, summaries, files + run.written_nll + run.written_series, f.failed,
                      f.warnings, interrupted, len(state["done"]), len(run.dataset.documents))


def unit_scores(run: LibriLightRun, records: list[dict]) -> tuple[list[dict], dict[str, list[UnitScores | None]]]:
    """The scored documents in dataset order, each with its `scores` (per policy: Σ nll and tokens of all
    Moshi-stream codebooks, overall and per bin: what the intervals resample), and those sums per policy.

    Args:
        run: the run (its state holds each document's sums per policy and bin).
        records: the scored documents' results.json entries (`Finished.documents`).
    """
    rank = {d.id: i for i, d in enumerate(run.dataset.documents)}
    docs, scores = [], {p.name: [] for p in run.policies}
    for rec in sorted(records, key=lambda r: rank.get(r["id"], len(rank))):  # the order a single process has
        per = run.state["docs"][rec["id"]]["policies"]
        mine = {}
        for p in run.policies:
            a = per.get(p.name)
            if a is None:
                scores[p.name].append(None)
                continue
            sums, counts = a["sums"]["all"], a["counts"]["all"]
            mine[p.name] = {"nll_sum": sum(sums), "tokens": sum(counts),
                            "bins": {"nll_sum": list(sums), "tokens": list(counts)}}
            scores[p.name].append(UnitScores((sum(sums), sum(counts)), list(zip(sums, counts))))
        docs.append({**rec, "scores": mine})
    return docs, scores


def rank_result(run: LibriLightRun, interrupted: bool) -> EvalResult:
    """What a rank other than 0 reports (its own share; rank 0 writes and reports the job's results).

    Args:
        run: the run.
        interrupted: Ctrl-C stopped this rank.
    """
    failed = [f"{s['path']}: {s['reason']}" for d in run.state["done"] for s in run.state["docs"][d]["record"]["skipped"]
              if s.get("failed", True)]
    return EvalResult(run.out, {}, [], [], failed, run.warnings, interrupted, len(run.state["done"]),
                      len(run.dataset.documents))


def write_outputs(run: LibriLightRun, results: dict, sections: dict, n_docs: int) -> list[str]:
    """results.json, curve.csv, curve.png, each atomic; Ctrl-C or a write failure here keeps the record.

    Args:
        run: the run.
        results: results.json's content.
        sections: its `policies` section.
        n_docs: the documents scored (for the plot's title).
    """
    out = run.out
    writers = [lambda: write_results(out / RESULTS, results),
               lambda: report.write_curve_csv(out / report.CURVE_CSV, sections),
               lambda: report.write_curve_png(out / report.CURVE_PNG, sections,
                                              f"{run.m.model_id}: NLL vs position ({n_docs} document(s), "
                                              f"{run.o.bin_seconds:g} s bins)")]
    return write_results_or_stop(out, run.state, [d.id for d in run.dataset.documents], writers,
                                 "results.json, curve.csv and curve.png")
