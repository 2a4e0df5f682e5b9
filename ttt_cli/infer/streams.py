"""The streams of a batch: input files played through one slot as 80 ms frames (Stream, Segment), and Mimi per slot."""

from __future__ import annotations

import array
import bisect
import typing as tp
from collections import deque

import numpy as np
import torch

from ..audio import FRAME_SIZE, WHOLE_FILE_SECONDS, FrameSource, WavStream, open_frames
from ..errors import InputError, WriteError
from ..io import as_os_error, describe_os_error
from .results import FileResult, Job


class Segment:
    """One input file inside a stream; what it produced is kept compactly (int64 arrays), and its
    decoded voice goes to `sink` as it comes when one is given, so memory stays flat in its length.

    Args:
        job: the file.
        mode: the run's resolved mode.
    """

    def __init__(self, job: Job, mode: str):
        self.result = FileResult(job, mode)
        self.source: FrameSource | None = None
        self.sink: WavStream | None = None
        self.start_frame = 0      # stream frame index of its first frame
        self.n_frames = 0
        self.fed = 0
        self.finalized = False
        self.telemetry_taken = False
        self.progress_started = False
        self.out_steps = array.array("q")    # stream steps of the outputs attributed to it
        self.out_text = array.array("q")
        self.out_audio = array.array("q")    # [n * dep_q] Moshi's audio tokens, step-major
        self.out_pcm: list[np.ndarray] = []  # decoded voice when there is no sink

    def add_pcm(self, pcm: np.ndarray) -> None:
        """Keeps decoded voice [FRAME_SIZE] float32: written to the sink, else held (a failed write fails the unit)."""
        if self.sink is None:
            self.out_pcm.append(pcm)
            return
        try:
            self.sink.write(pcm)
        except Exception as e:
            ose = as_os_error(e, self.sink.path)
            if ose is None:
                raise
            detail = describe_os_error(ose, self.sink.path)
            self.result.error = f"{self.result.job.path}: {detail}"
            raise WriteError.unit_removed(detail, self.result.job.path) from None

    def fail(self, reason: str) -> None:
        """The file cannot go on (found part-way through it): it ends here and counts as failed."""
        self.result.error = reason
        self.n_frames = self.fed
        self.source = None
        if self.sink is not None:
            self.sink.discard()

    def finish(self, state=None, dep_q: int = 0) -> FileResult:
        """Marks the file done and unpacks what it produced into its result (text and words are the caller's).

        Args:
            state: the stream's fast weights at its end (--save-state), given to the stream's last file.
            dep_q: Moshi's audio codebooks per step (0: none kept).
        Returns:
            its FileResult (a failed file's keeps only its error).
        """
        self.finalized = True
        res = self.result
        res.state = state
        if res.error is not None:  # failed part-way (`fail`): nothing of it is kept
            return res
        res.first_step = (self.out_steps[0] - self.start_frame) if self.out_steps else 0
        res.text_ids = self.out_text.tolist()
        if dep_q and self.out_audio:
            res.audio_codes = np.frombuffer(self.out_audio, np.int64).reshape(-1, dep_q).T.copy()  # [dep_q, n]
        if res.mode == "dialog":
            if self.sink is not None:
                self.sink.finish()
                res.audio_stream, self.sink = self.sink, None
            else:
                res.audio = np.concatenate(self.out_pcm) if self.out_pcm else np.zeros(0, np.float32)
        return res


class Stream:
    """Files played through one batch slot: one file (`--reset-policy file`) or all of them (`carry`).

    Args:
        jobs: the files, in playing order.
        mode: the run's resolved mode.
        channel: take this input channel instead of mixing down.
        pads: samples of silence (before, after) each file.
        whole_file_seconds: the longest file decoded whole (`ttt_cli.audio.open_frames`).
        audio_out: dialog mode: the `WavStream` a file's voice is written to as it comes (None: kept in memory).
    """

    def __init__(self, jobs: list[Job], mode: str, channel: int | None, pads: tuple[int, int],
                 whole_file_seconds: float = WHOLE_FILE_SECONDS,
                 audio_out: tp.Callable[[Job], WavStream] | None = None):
        self.pending = deque(jobs)
        self.mode = mode
        self.channel = channel
        self.pads = pads
        self.whole_file_seconds = whole_file_seconds
        self.audio_out = audio_out if mode == "dialog" else None
        self.segments: list[Segment] = []
        self.cur: Segment | None = None
        self.frames = 0           # frames fed so far
        self.step = 0             # LMGen steps so far
        self.failed: list[FileResult] = []
        self.history: deque = deque()   # transcribe: the input's recent Moshi-stream codes [dep_q], newest last
        self.baseline: dict[int, dict] = {}  # telemetry counters of the slot when the stream started

    def next_frame(self) -> np.ndarray | None:
        """The next 80 ms frame, moving to the next file when one ends; None when the stream is over."""
        while True:
            seg = self.cur
            if seg is not None and seg.fed < seg.n_frames:
                try:  # a long file is decoded as it goes: a damaged part shows up only now
                    frame = next(seg.source.frames, None)
                    if frame is None:
                        raise InputError(f"{seg.result.job.path}: decoded to fewer samples than its length "
                                         f"({seg.fed} of {seg.n_frames} frames).")
                except InputError as e:
                    seg.fail(str(e))
                    continue
                seg.fed += 1
                self.frames += 1
                return frame
            if seg is not None:
                seg.source = None  # fully fed: free the reader
            if not self.pending:
                return None
            job = self.pending.popleft()
            new = Segment(job, self.mode)
            try:
                src = open_frames(job.path, self.channel, self.pads, self.whole_file_seconds)
            except InputError as e:
                new.result.error = str(e)
                self.failed.append(new.result)
                continue
            new.result.info, new.result.read_whole = src.info, src.whole
            new.source = src
            new.n_frames = src.n_frames  # the partial last frame is dropped, as moshi does
            new.start_frame = self.frames
            self.segments.append(new)
            self.cur = new
            if self.audio_out is not None:
                new.sink = self.audio_out(job)

    def segment_for(self, s: int) -> Segment:
        """The file an output of stream step s belongs to: the one holding the last frame heard, s - 1."""
        f = max(s - 1, 0)
        starts = [g.start_frame for g in self.segments]
        return self.segments[max(bisect.bisect_right(starts, f) - 1, 0)]

    def record(self, s: int, text_id: int, audio_ids: list[int], pcm: np.ndarray | None) -> list[Segment]:
        """Keeps the output of stream step s with the file it belongs to.

        Args:
            s: the output's stream step (LMGen's step minus the largest delay).
            text_id: its text token.
            audio_ids: its Moshi audio tokens (dep_q of them, or none).
            pcm: its decoded voice [FRAME_SIZE] (dialog), or None.
        Returns:
            the files before that one not yet finalized: outputs arrive in step order, so they have all theirs.
        """
        seg = self.segment_for(s)
        seg.out_steps.append(s)
        seg.out_text.append(text_id)
        seg.out_audio.extend(audio_ids)
        if pcm is not None and seg.result.error is None:
            seg.add_pcm(pcm)
        done = []
        for older in self.segments:
            if older is seg:
                break
            if not older.finalized:
                done.append(older)
        return done

    def moshi_tokens(self, now: np.ndarray, delays: list[int]) -> np.ndarray:
        """transcribe: the input's Moshi-stream tokens [dep_q] in LMGen's delayed layout for this step.

        At step t, codebook k carries frame t - delay_k; earlier positions stay 0 (LMGen's initial token
        replaces them anyway).

        Args:
            now: this frame's Mimi codes on Moshi's stream [dep_q].
            delays: the LM's delay of each of Moshi's audio codebooks.
        """
        self.history.append(now)
        while len(self.history) > max(delays) + 1:
            self.history.popleft()
        t = self.step  # this frame's index in the stream (no double feed in transcribe)
        n = len(self.history)
        row = np.zeros(len(delays), dtype=np.int64)
        for k, d in enumerate(delays):
            if t - d >= 0:
                row[k] = self.history[n - 1 - d][k]
        return row


class MimiStreams:
    """Mimi for B slots, one stream at a time, each slot with its own streaming state.

    Mimi's convolutions and quantizer are not bit-identical across batch sizes (a 1e-7 latent
    difference flips a nearest-codebook choice), and a file must give the same codes in a batch as
    alone; so each slot keeps a single-stream state (encoder and decoder), swapped in for its call.

    Args:
        mimi: moshi's MimiModel.
        B: the batch slots.
        device: where frames go.
    """

    def __init__(self, mimi, B: int, device):
        self.mimi, self.device = mimi, device
        self.states: list[dict | None] = [None] * B
        self._silence_state: dict | None = None
        self._silence_codes: list = []  # transcribe: Mimi codes of silence frame t, same for every stream

    def _fresh(self) -> dict:
        """A new single-stream Mimi streaming state, not yet in use."""
        with self.mimi.streaming(1):
            return self.mimi.get_streaming_state()

    def _run(self, state: dict, fn, x):
        self.mimi.set_streaming_state(state)
        try:
            return fn(x)
        finally:
            self.mimi.set_streaming_state({k: None for k in state})

    def start(self, b: int) -> None:
        """Slot b starts a new stream: a fresh state, or its old one (and on CUDA its graphs) reset in place."""
        if self.states[b] is None:
            self.states[b] = self._fresh()
        else:
            self._run(self.states[b], lambda _: self.mimi.reset_streaming(), None)

    def encode(self, b: int, x):
        """Codes [1, n_q, 1] of one frame x [1, 1, FRAME_SIZE] of slot b."""
        return self._run(self.states[b], self.mimi.encode, x)

    def decode(self, b: int, codes):
        """PCM [1, 1, FRAME_SIZE] of one frame of audio codes [1, dep_q, 1] of slot b."""
        return self._run(self.states[b], self.mimi.decode, codes)

    def silence(self, t: int):
        """Mimi codes [n_q] of frame t of a silent stream (the user stream in transcribe mode)."""
        while len(self._silence_codes) <= t:  # streams advance one frame per tick: at most one encode
            if self._silence_state is None:
                self._silence_state = self._fresh()
            x = torch.zeros(1, 1, FRAME_SIZE, device=self.device)
            self._silence_codes.append(self._run(self._silence_state, self.mimi.encode, x)[0, :, 0])
        return self._silence_codes[t]
