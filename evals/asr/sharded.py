"""`ttt eval asr` under torchrun (SPEC §5.6): whole recordings shared among ranks, rank 0 merges."""

from __future__ import annotations

import typing as tp

from ttt_cli.distributed import current, header_seconds

from .. import resume, sharding
from ..run import EvalResult
from .data import AsrItem
from .loop import transcribe_pending
from .options import AsrRun


def transcribe_shared(run: AsrRun, config: dict, open_record: tp.Callable[[AsrRun, dict], None]) -> bool:
    """Transcribes the run's recordings on every rank of the job; rank 0 ends with every record merged.

    Rank 0 opens (or resumes) the run's record and shares the recordings still to do, balanced by
    duration; each rank transcribes its share, writes the hypotheses straight to their final names and
    every finished recording atomically as a record under `OUT/.ranks/<rank>/`; rank 0 then merges
    every rank's records into the resume state, from which `evals.asr.results.merge` scores every
    recording in dataset order, as a single process does. A run that stops keeps the records:
    `--resume`, with any number of processes, takes them as finished recordings.

    Args:
        run: the `AsrRun`.
        config: the run's resume configuration (`resume.run_config`).
        open_record: `(run, config)`: loads or starts the resume record (rank 0 only).
    Returns:
        True when Ctrl-C stopped some rank (rank 0: any rank; the others: their own).
    """
    s = current()
    items = run.dataset.items
    pending = None
    if s.is_main:
        open_record(run, config)
        done = set(run.state["done"])
        pending = [(it.key, _seconds(it)) for it in items if it.key not in done]
    mine = sharding.share_pending(pending)
    if not s.is_main:
        run.state = resume.new_state(config)
    interrupted = transcribe_pending(run, [it for it in items if it.key in mine], _commit_to_rank)
    merged = sharding.hand_over(run.out, run.state, [it.key for it in items],
                                {"interrupted": interrupted, "warnings": run.warnings})
    if merged is None:  # not rank 0
        return interrupted
    run.state, notes, stats = merged
    for st in stats[1:]:
        run.warnings += [w for w in st["warnings"] if w not in run.warnings]
    run.warnings += notes
    return any(st["interrupted"] for st in stats)


def rank_result(run: AsrRun, interrupted: bool) -> EvalResult:
    """What a rank other than 0 reports (its own share; rank 0 writes and reports the job's results).

    Args:
        run: the run.
        interrupted: Ctrl-C stopped this rank.
    """
    docs = run.state["docs"]
    failed = [f"{k}: {docs[k]['error']}" for k in run.state["done"] if docs[k].get("error")]
    return EvalResult(run.out, {}, [], [], failed, run.warnings, interrupted, len(run.state["done"]),
                      len(run.dataset.items))


def _seconds(item: AsrItem) -> float:
    """A recording's weight in the shares: its header duration (0 when it cannot be read: its rank reports it)."""
    return item.seconds if item.seconds is not None else header_seconds(item.audio)


def _commit_to_rank(run: AsrRun, item: AsrItem, entry: dict) -> None:
    """Commits one finished recording of this rank: its record (atomic), then the state in memory."""
    run.state = sharding.commit_to_rank(run.out, run.state, item.key, entry)
