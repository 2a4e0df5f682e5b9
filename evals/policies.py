"""Fast-weight reset policies of `ttt eval` (SPEC §6, §5.7): parsing, reset positions, one pass's settings."""

from __future__ import annotations

import contextlib
import re
import typing as tp
from dataclasses import dataclass

import torch

from ttt_cli.errors import ConfigError
from ttt_cli.fastweights.attach import set_ttt_lr, ttt_layers
from ttt_cli.units import parse_seconds, seconds_to_steps

KINDS = ("document", "file", "every", "never", "off")
SYNTAX = "document | file | every:<N>s (seconds, also 500ms, 2m) | every:<N> (steps) | never | off"


@dataclass(frozen=True)
class Policy:
    """One reset policy; each is its own pass over the cached codes.

    `name` is the label used in outputs (`every:2s`), `interval_steps` the reset period of
    `every:` policies in LM steps (80 ms each).
    """

    name: str
    kind: str
    interval_steps: int | None = None

    @property
    def dir_name(self) -> str:
        """Directory name under `token_nll/`: the policy with `:` replaced by `-` (SPEC §6)."""
        return self.name.replace(":", "-")

    @property
    def ttt_on(self) -> bool:
        """False for `off`: fast weights frozen at W0 for the whole pass (SPEC §3.4b)."""
        return self.kind != "off"

    @property
    def carries_across_documents(self) -> bool:
        """True for `never`: fast weights (pending chunk included) carry from one document to the next."""
        return self.kind == "never"

    def describe(self) -> str:
        return {
            "document": "fast weights reset at each document start",
            "file": "fast weights reset at each document start and each file boundary",
            "every": f"fast weights reset at each document start and every {self.interval_steps} steps",
            "never": "fast weights carry over from one document to the next (attention still resets)",
            "off": "fast weights frozen at W0 (no test-time training: the baseline)",
        }[self.kind]

    def reset_positions(self, steps: int, file_start_steps: list[int] | tuple[int, ...] = ()) -> list[int]:
        """Transformer input positions s (0 < s < steps) before which fast weights reset inside a document.

        The reset at the document start (position 0) is not listed: a document always starts a
        fresh stream, from W0 (or the warm start) except under `never`.

        Args:
            steps: the document's length in LM steps.
            file_start_steps: `start_step` of each file of the document.
        """
        if self.kind == "file":
            return sorted({s for s in file_start_steps if 0 < s < steps})
        if self.kind == "every":
            return list(range(self.interval_steps, steps, self.interval_steps))
        return []


def parse_policy(text: str) -> Policy:
    """Parses one `-p` value.

    Args:
        text: `document`, `file`, `every:<N>s` (seconds with a unit: `30s`, `2m`, `500ms`),
            `every:<N>` (steps), `never` or `off`.
    """
    s = text.strip().lower()
    if s in ("document", "file", "never", "off"):
        return Policy(s, s)
    m = re.fullmatch(r"every:(.+)", s)
    if m:
        arg = m.group(1).strip()
        if re.fullmatch(r"\d+", arg):
            steps = int(arg)
        else:
            try:
                steps = seconds_to_steps(parse_seconds(arg))
            except ConfigError:
                raise ConfigError(f"policy {text!r}: cannot read the period {arg!r}; expected steps (`every:100`) "
                                  f"or a time with a unit (`every:30s`, `every:2m`).") from None
            if not re.search(r"[a-z]$", arg):  # a bare decimal like 1.5 is ambiguous: ask for a unit
                raise ConfigError(f"policy {text!r}: write seconds with a unit (`every:{arg}s`) or whole steps.")
        if steps < 1:
            raise ConfigError(f"policy {text!r}: the period must be at least one step (80 ms).")
        return Policy(f"every:{arg}", "every", steps)
    raise ConfigError(f"unknown policy {text!r}. Valid policies: {SYNTAX}.")


def parse_policies(texts: list[str] | tuple[str, ...] | None) -> list[Policy]:
    """Parses repeated `-p` values (default `document`); duplicates are an error.

    Args:
        texts: the `-p` values (None or empty: `document`).
    """
    policies = [parse_policy(t) for t in (texts or ["document"])]
    names = [p.name for p in policies]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"policy {', '.join(dup)} given more than once.")
    dirs = [p.dir_name for p in policies]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"policies {', '.join(names)} map to the same output directory names.")
    return policies


@contextlib.contextmanager
def policy_settings(lm, ttt_on: bool, lr: float, warm_start: dict[int, dict[str, torch.Tensor]] | None = None
                    ) -> tp.Iterator[None]:
    """Sets the LM up for one policy's pass and puts it back afterwards.

    Args:
        lm: moshi LMModel with fast-weight layers, not streaming.
        ttt_on: False freezes fast weights at W0 for the pass (lr 0; SPEC §3.4b: the baseline,
            which ignores any warm start).
        lr: the run's learning rate, restored on exit.
        warm_start: {layer index: tensors as captured}: streams and resets start from them instead of W0.
    """
    layers = ttt_layers(lm)
    try:
        if not ttt_on:
            set_ttt_lr(lm, 0.0)
        if warm_start and ttt_on:
            for i, layer in layers.items():
                layer.set_warm_start(warm_start[i])
        yield
    finally:
        set_ttt_lr(lm, lr)
        if warm_start and ttt_on:
            for layer in layers.values():
                layer.set_warm_start(None)
