"""Deterministic shares of whole items for the ranks of a torchrun job, balanced by duration (SPEC §5.6)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import sphn


def balance(items: tp.Sequence[tuple[str, float]], world_size: int) -> list[list[str]]:
    """Shares of whole items for `world_size` ranks, balanced by weight (longest-first greedy).

    Items are taken heaviest first (ties: input order) and each goes to the rank with the least
    total so far (ties: the lowest rank). Every share keeps the input order. Deterministic.

    Args:
        items: (key, weight), e.g. (document id, seconds); weights < 0 count as 0.
        world_size: number of ranks.
    Returns:
        One list of keys per rank (some empty when there are fewer items than ranks).
    """
    order = sorted(range(len(items)), key=lambda i: (-max(float(items[i][1]), 0.0), i))
    loads = [0.0] * world_size
    owner: dict[int, int] = {}
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += max(float(items[i][1]), 0.0)
    return [[items[i][0] for i in range(len(items)) if owner[i] == r] for r in range(world_size)]


def header_seconds(path: Path | str) -> float:
    """An audio file's duration from its header (0 when it cannot be read: the rank that gets it reports it)."""
    try:
        return max(float(sphn.FileReader(str(path)).duration_sec), 0.0)
    except Exception:
        return 0.0
