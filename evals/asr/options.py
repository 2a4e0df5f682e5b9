"""`ttt eval asr`'s options, their checks, and what one run holds while it transcribes (SPEC §5.7)."""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.errors import ConfigError
from ttt_cli.units import seconds_to_steps

from ..policies import Policy, parse_policies
from ..intervals import DEFAULT_RESAMPLES
from ..run import check_resume_flags
from .data import AsrDataset
from .metrics import DEFAULT_BIN_SECONDS

MODES = ("auto", "stt", "transcribe")
# What --resume must find unchanged, by the option that sets it. --bin-seconds does not change a
# transcription (scores are recomputed from the hypotheses) and may differ.
ASR_FLAGS = {"policies": "-p/--policy", "mode": "--mode", "pad_before_s": "--pad-before",
             "pad_after_s": "--pad-after", "whole_file_seconds": "--whole-file-seconds",
             "init_state": "--init-state", "seed": "--seed", "data": "DATA"}


@dataclass
class AsrOptions:
    """Options of `ttt eval asr` (the CLI maps its flags one to one).

    Args:
        data: a directory of audio files with same-stem .txt references, or a .jsonl manifest.
        out: the output directory.
        policies: fast-weight reset policies (`document`, `every:<N>s`, `every:<N>`, `off`).
        mode: `auto` (stt for checkpoints without a depformer, else transcribe), `stt` or `transcribe`.
        pad_before, pad_after: seconds of silence around each recording (None: 1 s; text delay + 0.5 s).
        bin_seconds: width of the WER position bins.
        whole_file_seconds: recordings up to this long are decoded whole, longer ones in pieces.
        seed: the run's seed, also the bootstrap's.
        bootstrap: resamples of the 95% intervals (0: none).
    """

    data: Path
    out: Path
    model: str | None = None
    policies: list[str] = field(default_factory=lambda: ["document"])
    mode: str = "auto"
    pad_before: float | None = None
    pad_after: float | None = None
    bin_seconds: float = DEFAULT_BIN_SECONDS
    whole_file_seconds: float = 600.0
    resume: bool = False
    overwrite: bool = False
    init_state: Path | None = None
    force_state: bool = False
    device: str = "auto"
    dtype: str = "auto"
    ttt: dict | None = None
    base: str | None = None
    seed: int = 0
    bootstrap: int = DEFAULT_RESAMPLES  # --bootstrap: resamples of the 95% intervals (0: none; SPEC §5.8)


@dataclass
class AsrRun:
    """What one evaluation holds while it runs (built by `AsrTask.run`)."""

    o: AsrOptions
    policies: list[Policy]
    dataset: AsrDataset
    out: Path
    m: tp.Any
    mode: str
    pads: tuple[float, float]
    lr: float
    warm: dict | None
    protocol: dict
    model_rec: dict
    progress: tp.Any
    state: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    t_start: float = 0.0


def parse_asr_policies(texts: tp.Sequence[str] | None) -> list[Policy]:
    """The `-p` values that make sense for recordings: `document`, `every:...`, `off` (docs/asr.md).

    Args:
        texts: the `-p` values (None or empty: `document`).
    """
    policies = parse_policies(list(texts or ["document"]))
    for p in policies:
        if p.kind == "file":
            raise ConfigError("policy file: in eval asr each recording is one file and one stream, so `file` is "
                              "`document` (fast weights reset at each recording's start); use -p document.")
        if p.kind == "never":
            raise ConfigError("policy never: eval asr scores each recording on its own, so a recording's WER must "
                              "not depend on which recordings ran before it (nor on how a scale-out shares them); "
                              "use -p document, -p every:<N>s or -p off, and --init-state to start every recording "
                              "from fast weights adapted elsewhere.")
    return policies


def validate(o: AsrOptions) -> None:
    """Refuses options that cannot make a run (before the data is read).

    Args:
        o: the options.
    Raises:
        ConfigError: naming the option.
    """
    if o.mode not in MODES:
        raise ConfigError(f"--mode {o.mode}: eval asr transcribes with {', '.join(MODES)} (dialog does not "
                          f"transcribe).")
    if not (o.bin_seconds > 0 and math.isfinite(o.bin_seconds)) or seconds_to_steps(o.bin_seconds) < 1:
        raise ConfigError(f"--bin-seconds must be at least one step (0.08 s), got {o.bin_seconds}.")
    for flag, v in (("--pad-before", o.pad_before), ("--pad-after", o.pad_after),
                    ("--whole-file-seconds", o.whole_file_seconds)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{flag} must be seconds >= 0, got {v}.")
    if o.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be a number of resamples >= 0 (0: no intervals), got {o.bootstrap}.")
    check_resume_flags(o)
