"""Time units of the LM: 12.5 steps per second; parsing of times given on the command line."""

from __future__ import annotations

import re

from .errors import ConfigError

FRAME_RATE = 12.5  # Mimi frames (LM steps) per second.


def parse_seconds(text: str) -> float:
    """Parses a time: `1.5`, `30s`, `2m`, `1h` -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ConfigError(f"cannot read the time {text!r}: expected e.g. `1.5`, `30s`, `2m`.")
    mult = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    return float(m.group(1)) * mult


def seconds_to_steps(seconds: float) -> int:
    """SPEC §5: seconds become steps as round(seconds x 12.5)."""
    return int(round(seconds * FRAME_RATE))
