"""`ttt eval librilight` under torchrun (SPEC §5.6): whole documents shared among ranks, rank 0 merges."""

from __future__ import annotations

import typing as tp

from ttt_cli import timeline
from ttt_cli.distributed import current
from ttt_cli.errors import ConfigError

from .. import resume, sharding
from .data import Document
from .loop import score_all
from .options import LibriLightRun


def refuse_carrying(policies) -> None:
    """Policies that carry fast weights from one document to the next make documents one sequence: refused
    under torchrun.

    Args:
        policies: the parsed policies.
    """
    carrying = [p.name for p in policies if p.carries_across_documents]
    if carrying and current().active:
        raise ConfigError(f"policy {', '.join(carrying)} carries fast weights from one document to the next, so the "
                          f"documents form one sequence that cannot be shared among ranks. Run it without torchrun, "
                          f"or leave it out of this run.", hint="run -p never in a single process")


def score_shared(run: LibriLightRun, config: dict, open_resume: tp.Callable[[LibriLightRun, dict], None]) -> bool:
    """Scores the run's documents on every rank of the job; rank 0 ends with every record merged.

    Rank 0 opens (or resumes) the run's record and shares the documents still to do, balanced by
    duration; each rank scores its share and writes every finished document atomically as a record
    under `OUT/.ranks/<rank>/`; rank 0 then merges every rank's records into the resume state (in
    dataset order, the order a single process sums them in) and writes the outputs. A run that stops
    keeps the records: `--resume`, with any number of processes, takes them as finished documents.

    Args:
        run: the `LibriLightRun`.
        config: the run's resume configuration (`resume.run_config`).
        open_resume: `(run, config)`: loads or starts the resume record (rank 0 only).
    Returns:
        True when Ctrl-C stopped some rank (rank 0: any rank; the others: their own).
    """
    s = current()
    docs = run.dataset.documents
    pending = None
    if s.is_main:
        open_resume(run, config)
        done = set(run.state["done"])
        pending = [(d.id, min(d.seconds, run.o.max_seconds)) for d in docs if d.id not in done]
    mine = sharding.share_pending(pending)
    if not s.is_main:
        run.state = resume.new_state(config)
        run.carries = {p.name: None for p in run.policies}
    interrupted = score_all(run, [d for d in docs if d.id in mine], _commit_to_rank)
    merged = sharding.hand_over(run.out, run.state, [d.id for d in docs],
                                {"interrupted": interrupted, "encode_seconds": run.enc_seconds, "hits": run.hits,
                                 "misses": run.misses, "warnings": run.warnings, "token_nll": run.written_nll,
                                 "points": timeline.points()})
    if merged is None:  # not rank 0
        return interrupted
    run.state, notes, stats = merged
    run.rank_points = {str(r): st["points"] for r, st in enumerate(stats) if r}
    for st in stats[1:]:
        run.enc_seconds += st["encode_seconds"]
        run.hits, run.misses = run.hits + st["hits"], run.misses + st["misses"]
        run.warnings += [w for w in st["warnings"] if w not in run.warnings]
        run.written_nll += st["token_nll"]
    run.warnings += notes
    return any(st["interrupted"] for st in stats)


def _commit_to_rank(run: LibriLightRun, doc: Document, entry: dict) -> None:
    """Commits one finished document of this rank: its record (atomic), then the state in memory."""
    run.state = sharding.commit_to_rank(run.out, run.state, doc.id, entry)
