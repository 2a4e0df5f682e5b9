"""The per-document loop of `ttt eval librilight`: codes (cached or encoded), one pass per policy, commit."""

from __future__ import annotations

import time
import typing as tp

from ttt_cli import telemetry, timeline
from ttt_cli.codes import lm_input_codes
from ttt_cli.errors import TTTError
from ttt_cli.io import as_os_error
from ttt_cli.units import FRAME_RATE

from .. import resume
from ..policies import Policy, policy_settings
from ..run import stop_on_write_error
from . import report, scoring  # score_document called through its module: a test stands in for it
from .accum import Accum
from .codes_cache import DocumentCodes, document_codes
from .data import Document
from .options import LibriLightRun
from .outputs import series_paths
from .records import carry_path, doc_record, document_inputs, save_carry

Commit = tp.Callable[[LibriLightRun, Document, dict], None]


def stop(run: LibriLightRun, e: BaseException) -> tp.NoReturn:
    """`stop_on_write_error` for this run's documents.

    Args:
        run: the run.
        e: the error met.
    """
    stop_on_write_error(run.out, run.state, [d.id for d in run.dataset.documents], e)


def commit(run: LibriLightRun, doc: Document, entry: dict) -> None:
    """Commits one finished document to the resume record: carries first (they name it), then the record;
    it counts once written.

    Args:
        run: the run.
        doc: the document.
        entry: its resume entry.
    """
    for p in run.policies:
        if p.carries_across_documents and run.carries[p.name] is not None:
            save_carry(carry_path(run.out, p.dir_name), run.carries[p.name], doc.id)
    state = resume.with_document(run.state, doc.id, entry)
    resume.write_state(resume.state_dir(run.out), state)
    run.state = state


def estimated_steps(run: LibriLightRun, docs: list[Document]) -> float:
    """The steps scoring `docs` under every policy takes, from their header durations (the progress total).

    Args:
        run: the run.
        docs: the documents.
    """
    return sum(min(d.seconds, run.o.max_seconds) for d in docs) * FRAME_RATE * len(run.policies)


def score_all(run: LibriLightRun, todo: list[Document] | None = None, commit: Commit = commit) -> bool:
    """Scores the documents `todo` (default: every one not done yet), handing each finished one to
    `commit(run, doc, entry)`; True when Ctrl-C stopped it.

    Args:
        run: the run.
        todo: the documents to score (under torchrun: this rank's share).
        commit: what records a finished document (under torchrun: a rank record).
    """
    docs = run.dataset.documents
    done = set(run.state["done"])
    first, of = (len(done) + 1, len(docs)) if todo is None else (1, len(todo))  # torchrun: this rank's share
    todo = [d for d in docs if d.id not in done] if todo is None else todo
    est_steps = estimated_steps(run, todo)
    run.progress.log(f"scoring {len(todo)} of {len(docs)} document(s) x {len(run.policies)} policy(ies): "
                     f"{', '.join(p.name for p in run.policies)}")
    run.progress.start("eval", "scoring", est_steps)
    t_loop = time.perf_counter()
    timeline.mark("scoring_started")
    interrupted = False
    try:
        for n_doc, doc in enumerate(todo, start=first):
            entry = score_one(run, doc, f"{n_doc}/{of}", t_loop)
            commit(run, doc, entry)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        if isinstance(e, TTTError) or as_os_error(e) is None:
            raise
        stop(run, e)
    timeline.mark("scoring_done")
    run.progress.finish("eval", documents=len(run.state["done"]), steps_scored=int(run.scored_steps))
    return interrupted


def codes_of(run: LibriLightRun, doc: Document, label: str) -> DocumentCodes:
    """The document's codes (from the codes cache, or encoded), counted in the run's cache statistics.

    Args:
        run: the run.
        doc: the document.
        label: its progress label (`n/N`).
    """
    o, m = run.o, run.m
    dc = document_codes(m.mimi, doc, o.max_seconds, run.cache_dir, str(m.device), mimi_fp=run.mimi_fp,
                        store=run.store)
    run.enc_seconds += dc.encode_seconds
    run.hits, run.misses = run.hits + dc.cache_hit, run.misses + (not dc.cache_hit)
    run.warnings += dc.warnings
    run.progress.log(f"[{label}] {doc.id}: {dc.seconds:.1f} s, {dc.steps} steps, "
                     f"{'codes cache hit' if dc.cache_hit else 'encoded'} in {dc.encode_seconds:.2f} s"
                     + (f", {len(dc.skipped)} file(s) skipped" if dc.skipped else ""))
    return dc


def score_one(run: LibriLightRun, doc: Document, label: str, t_loop: float) -> dict:
    """Encodes (or finds cached) one document and scores it under every policy; returns its resume entry.

    Args:
        run: the run.
        doc: the document.
        label: its progress label (`n/N`).
        t_loop: when the loop started (`time.perf_counter()`), for the steps/s shown.
    """
    o, lm = run.o, run.m.lm
    dc = codes_of(run, doc, label)
    rec = doc_record(doc, dc, run.dataset.root)
    entry = {"record": rec, "policies": {}, "telemetry": {}, "encode_seconds": dc.encode_seconds,
             "inputs": document_inputs(doc, dc, run.dataset.root), "warnings": list(dc.warnings)}
    if dc.steps == 0:
        entry["skipped_document"] = {"id": doc.id, "reason": "no file could be decoded", "skipped": rec["skipped"]}
        return entry
    codes = lm_input_codes(lm, dc.codes, o.audio_stream, o.text_stream)  # [K, T]
    starts = [f.start_step for f in dc.files]
    for p in run.policies:
        score_policy(run, doc, p, codes, p.reset_positions(dc.steps, starts), entry, label, t_loop)
    return entry


def score_policy(run: LibriLightRun, doc: Document, p: Policy, codes, resets: list[int], entry: dict, label: str,
                 t_loop: float) -> None:
    """One policy's pass over one document: its sums into `entry`, its update series and token NLL written.

    Args:
        run: the run.
        doc: the document.
        p: the policy.
        codes: [K, T] the LM input codes.
        resets: the policy's reset positions in the document.
        entry: the document's resume entry, filled in.
        label: its progress label.
        t_loop: when the loop started.
    """
    o, m, lm = run.o, run.m, run.m.lm
    base = run.scored_steps

    def on_block(done: int) -> None:
        el = time.perf_counter() - t_loop
        run.progress.update("eval", base + done, doc=label, policy=p.name,
                            steps_per_s=f"{(base + done) / el:.0f}" if el > 0 else "-")

    with policy_settings(lm, p.ttt_on, run.lr, run.warm):
        sc = scoring.score_document(lm, codes, resets, o.block_steps, carry=run.carries[p.name],
                                    keep_carry=p.carries_across_documents, on_block=on_block,
                                    record=o.telemetry is not None)
    run.scored_steps += sc.steps
    acc = Accum()
    acc.add(sc.nll, sc.text_nll, run.bin_steps, sc.seconds)
    entry["policies"][p.name] = acc.to_dict()
    entry["telemetry"][p.name] = {str(i): t for i, t in sc.telemetry.items()}
    if p.carries_across_documents:
        run.carries[p.name] = sc.carry
    if o.telemetry is not None:
        files = telemetry.write_series(series_paths(o, p, doc.id), sc.updates or {}, 0,
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
