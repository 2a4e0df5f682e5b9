"""Per-file commands under torchrun (infer, export-state): whole files shared by duration, accounts merged."""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

from ..ledger import InputRecord
from .session import current
from .shares import balance, header_seconds


def share_files(paths: tp.Sequence[Path | str]) -> list[int]:
    """The indices of this rank's inputs: whole files balanced by their header duration (rank 0 decides).

    Without torchrun: every index, one share (the provenance of a single process).
    """
    s = current()
    if not s.active:
        s.set_shares([[str(p) for p in paths]])
        return list(range(len(paths)))
    shares = None
    if s.is_main:
        shares = [[int(k) for k in share]
                  for share in balance([(str(i), header_seconds(p)) for i, p in enumerate(paths)], s.world_size)]
    shares = s.share("files", shares)
    s.set_shares([[str(paths[i]) for i in share] for share in shares])
    return shares[s.rank]


def gather_accounts(ledger, keys: tp.Iterable[int], extra: tp.Any = None) -> list | None:
    """Hands this rank's accounts of its inputs (and `extra`) to rank 0, which puts them into `ledger`.

    Args:
        ledger: the run's `InputLedger` over every input, keyed by input index.
        keys: the indices of this rank's inputs.
        extra: anything else JSON-able this rank reports (rows of the summary, result objects).
    Returns:
        Rank 0: every rank's `extra`, by rank (its own included); the other ranks: None.
    """
    s = current()
    mine = {str(k): dataclasses.asdict(ledger.records[k]) for k in keys}
    got = s.gather("accounts", {"records": mine, "extra": extra})
    if got is None:
        return None
    for g in got:
        for k, rec in g["records"].items():
            ledger.records[int(k)] = InputRecord(**rec)
    return [g["extra"] for g in got]
