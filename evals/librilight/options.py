"""`ttt eval librilight`'s options, their checks, and what one run holds while it scores (SPEC §6)."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.audio import FRAME_SIZE, SAMPLE_RATE
from ttt_cli.errors import ConfigError
from ttt_cli.units import seconds_to_steps

from ..policies import Policy
from ..intervals import DEFAULT_RESAMPLES
from ..run import check_resume_flags
from .data import Dataset
from .scoring import DEFAULT_BLOCK_STEPS

AUDIO_STREAMS = ("moshi", "user")
TEXT_STREAMS = ("zero", "pad")
# What `--resume` must find unchanged, by the option (or input) that sets it. block_steps, the codes
# cache and --save-token-nll do not change the numbers and may differ.
PROTOCOL_FLAGS = {"policies": "-p/--policy", "max_seconds": "--max-seconds", "min_seconds": "--min-seconds",
                  "limit_books": "--limit-books", "bin_seconds": "--bin-seconds", "audio_stream": "--audio-stream",
                  "text_stream": "--text-stream", "init_state": "--init-state", "seed": "--seed", "data": "DATA"}


@dataclass
class EvalOptions:
    """Options of `ttt eval librilight` (the CLI maps its flags one to one)."""

    data: Path
    out: Path
    model: str | None = None
    policies: list[str] = field(default_factory=lambda: ["document"])
    max_seconds: float = 3600.0
    min_seconds: float = 0.0
    limit_books: int | None = None
    block_steps: int = DEFAULT_BLOCK_STEPS
    bin_seconds: float = 60.0
    audio_stream: str = "moshi"
    text_stream: str = "zero"
    codes_cache: Path | None = None   # None: the default under the user cache
    use_codes_cache: bool = True
    save_token_nll: bool = False
    resume: bool = False
    overwrite: bool = False
    init_state: Path | None = None
    force_state: bool = False         # accept a snapshot whose lr/clip differ from the model's
    device: str = "auto"
    dtype: str = "auto"
    ttt: dict | None = None           # overrides of the `ttt` section
    base: str | None = None           # --base of a fine-tuning fork checkpoint (SPEC §4.3)
    seed: int = 0
    bootstrap: int = DEFAULT_RESAMPLES  # --bootstrap: resamples of the 95% intervals (0: none; SPEC §5.8)
    telemetry: Path | None = None     # --telemetry: the update series per policy and document (SPEC §3.7)


def validate(o: EvalOptions) -> None:
    """Refuses options that cannot make a run (before the data is read).

    Args:
        o: the options.
    Raises:
        ConfigError: naming the option.
    """
    if o.block_steps < 1:
        raise ConfigError(f"--block-steps must be >= 1, got {o.block_steps}.")
    if not o.bin_seconds > 0 or seconds_to_steps(o.bin_seconds) < 1:
        raise ConfigError(f"--bin-seconds must be at least one step (0.08 s), got {o.bin_seconds}.")
    if o.max_seconds is not None and 0 < o.max_seconds and int(round(o.max_seconds * SAMPLE_RATE)) < FRAME_SIZE:
        raise ConfigError(f"--max-seconds {o.max_seconds:g} leaves nothing to score: a document needs at least one "
                          f"80 ms frame (--max-seconds 0.08 or more).", hint="give --max-seconds of 0.08 s or more")
    if o.audio_stream not in AUDIO_STREAMS:
        raise ConfigError(f"--audio-stream must be one of {', '.join(AUDIO_STREAMS)}, got {o.audio_stream!r}.")
    if o.text_stream not in TEXT_STREAMS:
        raise ConfigError(f"--text-stream must be one of {', '.join(TEXT_STREAMS)}, got {o.text_stream!r}.")
    if o.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be a number of resamples >= 0 (0: no intervals), got {o.bootstrap}.")
    check_resume_flags(o)


def check_layout(lm, o: EvalOptions) -> None:
    """Refuses a model and stream layout that leave nothing to score.

    Args:
        lm: the loaded moshi LMModel.
        o: the options (`audio_stream`, `text_stream`).
    """
    audio = lm.dep_q > 0 and o.audio_stream == "moshi"
    text = o.text_stream == "pad"
    if not (audio or text):
        why = ("this checkpoint has no depformer (dep_q = 0), so no audio codebook is predicted"
               if lm.dep_q == 0 else "with --audio-stream user the audio is input only and Moshi's own stream "
                                     "(what the depformer predicts) is empty")
        raise ConfigError(f"nothing to score: {why}, and the text stream is -1 (--text-stream zero). Use "
                          f"--audio-stream moshi on a checkpoint with a depformer, or --text-stream pad to score "
                          f"the text stream.")


@dataclass
class LibriLightRun:
    """What one evaluation holds while it runs (built by `LibriLightTask.run`)."""

    o: EvalOptions
    policies: list[Policy]
    dataset: Dataset
    out: Path
    m: tp.Any
    cache_dir: Path | None
    store: bool                # new codes cache entries are written (False: the cache is read only)
    warm: dict | None
    lr: float
    mimi_fp: str
    bin_steps: int
    progress: tp.Any
    state: dict = field(default_factory=dict)
    carries: dict = field(default_factory=dict)
    written_nll: list = field(default_factory=list)
    written_series: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    scored_steps: float = 0.0
    enc_seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    # {rank: its `ttt_cli.timeline` points} of the other ranks of a torchrun job (rank 0 gathers them)
    rank_points: dict = field(default_factory=dict)
