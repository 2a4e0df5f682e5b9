"""What `ttt infer` returns: one result per input file and the run's shared settings; the `<stem>.json` object."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import AudioInfo, WavStream
from ..units import FRAME_RATE
from .subtitles import DEFAULT_FORMATS


@dataclass
class Job:
    """One input file and the stem its outputs are named after."""

    index: int
    path: Path
    stem: str


@dataclass
class Token:
    """One text token of the output (padding dropped)."""

    step: int     # LM step (80 ms) counted from the file's start
    time: float   # seconds on the file's timeline (see docs/infer.md)
    id: int
    piece: str


@dataclass
class Word:
    """One word of the output with its times (seconds on the file's timeline; steps from the file's start)."""

    word: str
    start: float
    end: float
    start_step: int
    end_step: float


@dataclass
class FileResult:
    """Everything one input produced (or why it failed)."""

    job: Job
    mode: str
    error: str | None = None
    info: AudioInfo | None = None
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    first_step: int = 0                     # file-relative step of text_ids[0]
    text_ids: list[int] = field(default_factory=list)   # text token of every output step, pads included
    audio_codes: tp.Any = None              # [dep_q, n] int64 numpy: Moshi's audio tokens per output step
    audio: tp.Any = None                    # [samples] float32 numpy: Moshi's voice (dialog mode, kept in memory)
    audio_stream: WavStream | None = None   # Moshi's voice written as produced (dialog mode with `audio_out`)
    read_whole: bool = True                 # decoded whole (moshi.run_inference's way) or in pieces
    steps: int = 0                          # LMGen steps that fed this file's frames
    wall_seconds: float = 0.0
    telemetry: dict[int, dict] = field(default_factory=dict)
    updates: dict | None = None             # the update series of this file ({layer: [UpdateRow]}, --telemetry)
    slot: int = 0                           # the batch item (stream) that played it
    stream: dict = field(default_factory=dict)
    state: tp.Any = None                    # FastWeightState captured at the stream's end (--save-state)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ms_per_step(self) -> float:
        return 1000.0 * self.wall_seconds / self.steps if self.steps else 0.0

    @property
    def realtime_factor(self) -> float:
        """Wall time / audio duration (< 1: faster than real time)."""
        return self.wall_seconds / self.info.seconds if self.info and self.info.seconds else 0.0


@dataclass
class InferRun:
    """A whole `infer` call: settings shared by every file, and the per-file results in input order."""

    mode: str
    model: dict
    ttt: dict
    sampling: dict
    seed: int
    batch_size: int
    reset_policy: str
    init_state: str | None
    results: list[FileResult]
    telemetry: str | None = None   # --telemetry directory
    distributed: dict | None = None   # world size, backend, shares (SPEC §5.6), set by the command
    formats: tuple[str, ...] = DEFAULT_FORMATS   # the files written per input (--format)
    subtitles: dict | None = None     # how cues were cut (max_line_width, max_line_count), with a subtitle format

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]


def result_json(res: FileResult, run: InferRun) -> dict:
    """The `<stem>.json` object of one input (schema in docs/infer.md).

    Args:
        res: the input's result.
        run: the run it belongs to (shared settings).
    """
    if not res.ok:
        return {"input": {"path": str(res.job.path)}, "error": res.error, "mode": run.mode}
    d: dict[str, tp.Any] = {
        "input": {**res.info.to_dict(), "read": "whole" if res.read_whole else "pieces"} if res.info
        else {"path": str(res.job.path)},
        "model": run.model,
        "mode": run.mode,
        "text": res.text,
        "tokens": [{"step": t.step, "time": t.time, "id": t.id, "piece": t.piece} for t in res.tokens],
        "words": [{"word": w.word, "start": w.start, "end": w.end} for w in res.words],
        "audio_out": res.outputs.get("wav"),
        "steps": res.steps,
        "ms_per_step": round(res.ms_per_step, 3),
        "realtime_factor": round(res.realtime_factor, 4),
        "ttt": {**run.ttt, "init_state": run.init_state,
                "telemetry": {str(i): t for i, t in sorted(res.telemetry.items())}},
        "sampling": run.sampling,
        "seed": run.seed,
        "batch_size": run.batch_size,
        "reset_policy": run.reset_policy,
        "outputs": dict(res.outputs),
    }
    if run.subtitles is not None:
        d["subtitles"] = run.subtitles
    if run.distributed is not None:
        d["distributed"] = run.distributed
    if run.reset_policy == "carry":
        d["stream"] = {"start_step": res.stream.get("start_step", 0),
                       "start_seconds": res.stream.get("start_step", 0) / FRAME_RATE}
    if res.state is not None or "state" in res.outputs:
        d["state_out"] = res.outputs.get("state")
    return d
