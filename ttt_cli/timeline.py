"""When this process reached the points of a command run (Unix seconds): where a run's fixed costs go."""

from __future__ import annotations

import time

# {point: Unix time}. "process" is set when ttt_cli is first imported (ttt_cli/__init__.py); a command
# run starts its own points with `begin`. Unix time, not a monotonic clock: the points of the ranks of
# a torchrun job and of the program that launched it are compared with each other.
_POINTS: dict[str, float] = {}


def mark(point: str) -> None:
    """Records now as the time this process reached `point` (a later mark of the same point replaces it).

    Args:
        point: its name, e.g. "model_loaded".
    """
    _POINTS[point] = time.time()


def begin() -> None:
    """Starts a command run's points: drops an earlier run's (in the same process), keeps "process", marks "command"."""
    kept = {k: v for k, v in _POINTS.items() if k == "process"}
    _POINTS.clear()
    _POINTS.update(kept)
    mark("command")


def points() -> dict[str, float]:
    """This process's points so far, in the order they were first reached."""
    return dict(_POINTS)
