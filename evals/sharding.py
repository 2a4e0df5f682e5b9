"""What every eval task does under torchrun (SPEC §5.6): rank 0's plan shared, per-rank records, rank 0 merges."""

from __future__ import annotations

import typing as tp
from pathlib import Path

from ttt_cli.distributed import balance, current

from . import resume


def share_pending(pending: tp.Sequence[tuple[str, float]] | None) -> set[str]:
    """This rank's items of the run: rank 0's pending items, balanced by duration among the ranks.

    Args:
        pending: rank 0: (item id, seconds) of every item still to do, in dataset order (the other ranks:
            None, they take rank 0's plan).
    Returns:
        the ids of this rank's share (the shares are kept as the session's provenance).
    """
    s = current()
    shares = balance(list(pending or ()), s.world_size) if s.is_main else None
    s.set_shares(s.share("eval-plan", shares))
    return set(s.mine())


def commit_to_rank(out: Path, state: dict, item_id: str, entry: dict) -> dict:
    """Commits one finished item of this rank: its record under `OUT/.ranks/<rank>/` (atomic), then the state.

    Args:
        out: --out.
        state: this rank's resume state (its `config` goes into the record).
        item_id: the item's id (a document id, a recording's key).
        entry: its resume entry.
    Returns:
        the state with the item added (what the caller keeps).
    """
    s = current()
    resume.write_rank_record(out, s.rank, item_id, entry, state["config"])
    state = resume.with_document(state, item_id, entry)
    s.after_item()
    return state


def hand_over(out: Path, state: dict, order: list[str],
              stats: dict) -> tuple[dict, list[str], list[dict]] | None:
    """Hands every rank's `stats` to rank 0, which merges every rank's records into its resume state.

    Records are merged in dataset order (the order a single process sums them in) and the state file is
    written; `OUT/.ranks/` is removed once every record is in it (a damaged record keeps it, and its item
    is computed again by `--resume`).

    Args:
        out: --out.
        state: rank 0's resume state (the other ranks': unused).
        order: every item id of the dataset, in order.
        stats: what this rank reports (JSON-able; the task's counters, warnings, whether it was interrupted).
    Returns:
        rank 0: (the merged state, notes on damaged or unreadable records, every rank's `stats` by rank);
        the other ranks: None.
    """
    s = current()
    got = s.gather("eval-stats", stats)
    if not s.is_main:
        return None
    records, notes = resume.read_rank_records(out)
    state, damaged = resume.merge_records(state, records, order)
    resume.write_state(resume.state_dir(out), state)
    if not damaged:
        resume.remove_ranks(out)  # everything is in the state file now
    notes = notes + [f"{d}: its record under {resume.ranks_dir(out)} is damaged; --resume computes it again."
                     for d in damaged]
    return state, notes, got


def distributed_record(done: list[str]) -> dict:
    """SPEC §5.6 provenance: world size, backend and each rank's items (one share without torchrun).

    Args:
        done: the finished items.
    """
    s = current()
    return s.record() if s.active else {"world_size": 1, "backend": None, "shares": {"0": list(done)}}
