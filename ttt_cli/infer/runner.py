"""`ttt infer`'s streaming loop: audio files through Mimi and moshi's `LMGen` with TTT, batched (SPEC §5.1)."""

from __future__ import annotations

import time
import typing as tp
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..audio import FRAME_SIZE, SAMPLE_RATE, WavStream
from ..progress import NullProgress, Progress
from ..seed import set_seed
from .files import plan_jobs
from .options import InferOptions, batch_slots, model_facts, padding, preflight, ttt_summary
from .results import FileResult, InferRun, Job
from .slots import Slots, initial_state
from .streams import Segment, Stream
from .words import decode_text, special_ids, text_words

PROGRESS_EVERY = 5  # ticks between progress updates


def infer(model, paths: tp.Sequence[str | Path] | list[Job], opts: InferOptions,
          progress: Progress | None = None,
          on_result: tp.Callable[[FileResult, InferRun], None] | None = None,
          audio_out: tp.Callable[[Job], WavStream] | None = None) -> InferRun:
    """Streams audio files through Mimi and moshi's LMGen, as moshi.run_inference does, with TTT.

    Files up to `opts.whole_file_seconds` are decoded whole as moshi.run_inference decodes them,
    longer ones in bounded pieces (`ttt_cli.audio.open_frames`).
    Conventions of moshi.run_inference: Mimi encodes frame by frame, one `LMGen.step` per frame,
    the first frame is fed twice (dialog, stt), the partial last frame is dropped, a run stops
    when its input ends, STT input is padded with `stt_config`'s silence prefix and
    `audio_delay_seconds + 1 s`. Several files share a batch (`batch_size` slots, each stream with
    its own fast weights); a finished slot takes the next file after a reset of that slot only
    (`LMGen(support_out_of_sync=True)` + exec masks, pitfall 8), and Mimi runs each stream with
    its own state, so that a file gives the same tokens in a batch as alone (greedy, fp32).

    Args:
        model: a TTTModel from `load_model`.
        paths: input files (or planned Jobs).
        opts: the options.
        progress: progress hook (per file: seconds done/total, steps/s, real-time factor).
        on_result: called with each file's result (failures included) and the run's shared settings
            as soon as the file is complete, e.g. to write its outputs.
        audio_out: dialog mode: gives the `WavStream` a file's generated voice is written to as it is
            produced (memory flat in its length; `FileResult.audio_stream`, finished, for the caller to
            commit: `write_result` does); None keeps it in memory (`FileResult.audio`). Unfinished
            streams are discarded when the run fails or is interrupted.
    Returns:
        InferRun with one FileResult per input, in input order.
    """
    jobs = list(paths) if paths and isinstance(paths[0], Job) else plan_jobs(paths)  # type: ignore[arg-type]
    mode, sampling = preflight(model, opts, len(jobs))
    init_state = initial_state(model, opts)
    streams = [[j] for j in jobs] if opts.reset_policy == "file" else [jobs]
    B = batch_slots(opts, len(jobs))
    run = InferRun(mode=mode, model=model_facts(model), ttt=ttt_summary(model), sampling=sampling, seed=opts.seed,
                   batch_size=B, reset_policy=opts.reset_policy,
                   init_state=str(opts.init_state) if opts.init_state else None, results=[],
                   telemetry=str(opts.telemetry) if opts.telemetry is not None else None,
                   formats=tuple(opts.formats), subtitles=opts.cue_limits())
    results: dict[int, FileResult] = {}

    def deliver(res: FileResult) -> None:
        results[res.job.index] = res
        if on_result is not None:
            on_result(res, run)

    set_seed(opts.seed)
    with torch.no_grad():
        slots = Slots(model, B, sampling, opts, init_state)
        Runner(model, mode, opts, slots, progress or NullProgress(), deliver, audio_out).run(streams)
    run.results = [results[j.index] for j in jobs]
    return run


class Runner:
    """The batched streaming loop: one tick encodes one frame per live slot and steps LMGen.

    Which stream plays in which slot, and which file an output belongs to, is kept here; the model's
    per-slot state is `Slots`'.

    Args:
        model: a TTTModel.
        mode: the resolved mode.
        opts: the options.
        slots: LMGen and Mimi over the batch.
        progress: progress hook.
        deliver: called with each file's result as soon as it is complete.
        audio_out: dialog mode: the `WavStream` of a file's voice (None: kept in memory).
    """

    def __init__(self, model, mode: str, opts: InferOptions, slots: Slots, progress: Progress,
                 deliver: tp.Callable[[FileResult], None], audio_out: tp.Callable[[Job], WavStream] | None = None):
        self.m, self.mode, self.opts, self.slots, self.B = model, mode, opts, slots, slots.B
        self.progress, self.deliver, self.audio_out = FileProgress(progress), deliver, audio_out
        lm = model.lm
        self.max_delay, self.dep_q = max(lm.delays), lm.dep_q
        self.moshi_delays = list(lm.delays[1:1 + self.dep_q])
        self.double_feed = mode != "transcribe"
        self.pads, self.time_offset = padding(model, mode, opts)
        self.special = special_ids(model)
        self.streams: list[Stream | None] = [None] * self.B  # the stream each slot plays
        self.ticks = 0

    def run(self, streams: list[list[Job]]) -> None:
        """Plays every stream (a list of files each) through the slots until all have ended."""
        queue = deque(Stream(s, self.mode, self.opts.channel, self.pads, self.opts.whole_file_seconds,
                             self.audio_out) for s in streams)
        try:
            with self.slots.streaming():
                while True:
                    frames, new = self._fill(queue)
                    live = [f is not None for f in frames]
                    if not any(live):
                        break
                    self._tick(frames, live, new)
        except BaseException:  # a failure or Ctrl-C: no generated audio of an unfinished file stays
            for stream in self.streams:
                for seg in (stream.segments if stream is not None else ()):
                    if seg.sink is not None:
                        seg.sink.discard()
            raise

    def _fill(self, queue: deque) -> tuple[list[np.ndarray | None], list[bool]]:
        """The next frame of every slot, refilling free slots; (frames, whether the slot's stream is new)."""
        frames: list[np.ndarray | None] = [None] * self.B
        new = [False] * self.B
        for b in range(self.B):
            while True:
                stream = self.streams[b]
                if stream is None:
                    if not queue:
                        break
                    stream = queue.popleft()
                    self.streams[b] = stream
                    stream.baseline = self.slots.start(b)
                    new[b] = True
                frame = stream.next_frame()
                for res in stream.failed:
                    self.deliver(res)
                stream.failed.clear()
                if frame is not None:
                    frames[b] = frame
                    if stream.cur is not None:
                        self.progress.start(stream.cur)
                    break
                self._end(b)  # input over: the stream stops, as in moshi.run_inference
                new[b] = False
        return frames, new

    def _tick(self, frames: list[np.ndarray | None], live: list[bool], new: list[bool]) -> None:
        t0 = time.perf_counter()
        codes = self.slots.encode(frames)  # [B, n_q, 1]
        user, replace = codes, None
        if self.mode == "transcribe":
            user, replace = transcribe_inputs(self.slots, self.streams, codes, live, self.moshi_delays)
        first = [n and l for n, l in zip(new, live)]
        if self.double_feed and any(first):
            # moshi.run_inference feeds the first frame twice, else the initial token hides it.
            self._step(first, user)
            for b in range(self.B):
                if first[b]:
                    self.streams[b].step += 1
        out = self._step(live, user, replace)  # [B, 1 + dep_q, 1]
        out_cpu = out[:, :, 0].cpu()
        valid = [live[b] and bool((out_cpu[b] >= 0).all()) for b in range(self.B)]
        pcm = self.slots.voice(out, valid) if self.mode == "dialog" else {}  # Moshi's voice, decoded as it goes
        dt = time.perf_counter() - t0
        self.ticks += 1
        for b in range(self.B):
            if live[b] and self.streams[b] is not None:
                self._advance(b, out_cpu[b] if valid[b] else None, pcm.get(b), new[b], dt)

    def _step(self, bits: list[bool], user: torch.Tensor, replace: torch.Tensor | None = None) -> torch.Tensor:
        """An LMGen step of the slots `bits` selects; with `reset_every_steps`, the fast weights of the streams
        about to take step N, 2N, ... reset first."""
        n = self.opts.reset_every_steps
        reset = [bits[b] and s is not None and s.step > 0 and s.step % n == 0
                 for b, s in enumerate(self.streams)] if n else None
        return self.slots.step(bits, user, replace, reset)

    def _advance(self, b: int, out: torch.Tensor | None, pcm: np.ndarray | None, new: bool, dt: float) -> None:
        """Slot b took a step: its output out [1 + dep_q] (None: not valid yet) goes to its file."""
        stream = self.streams[b]
        o = stream.step
        stream.step += 1
        cur = stream.cur
        cur.result.steps += 2 if new and self.double_feed else 1
        cur.result.wall_seconds += dt
        if out is not None:
            for older in stream.record(o - self.max_delay, int(out[0]), out[1:].tolist(), pcm):
                self._finalize(stream, older)
        if cur.fed == cur.n_frames and not cur.telemetry_taken:
            cur.telemetry_taken = True
            cur.result.telemetry = self.slots.telemetry(b, stream.baseline)
            cur.result.slot = b
            if self.opts.telemetry is not None:  # one device read per file
                cur.result.updates = self.slots.updates(b)
        if self.ticks % PROGRESS_EVERY == 0 or cur.fed == cur.n_frames:
            self.progress.update(cur)

    def _end(self, b: int) -> None:
        """Slot b's stream is over: its files not yet finalized are, the last with the stream's end state."""
        stream = self.streams[b]
        assert stream is not None
        state = self.slots.end_state(b) if stream.segments else None
        for seg in stream.segments:
            if not seg.finalized:
                self._finalize(stream, seg, state if seg is stream.segments[-1] else None)
        self.streams[b] = None

    def _finalize(self, stream: Stream, seg: Segment, state=None) -> None:
        res = seg.finish(state, self.dep_q)
        if res.ok:
            res.text = decode_text(self.m, res.text_ids, self.special)
            res.tokens, res.words = text_words(self.m, seg.out_steps, res.text_ids, self.time_offset,
                                               seg.n_frames, self.mode == "stt", seg.start_frame, self.special)
            res.stream = {"start_step": seg.start_frame, "paths": [str(s.result.job.path) for s in stream.segments]}
            self.progress.finish(res)
        self.deliver(res)


def transcribe_inputs(slots: Slots, streams: list[Stream | None], codes: torch.Tensor, live: list[bool],
                      delays: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """transcribe mode's LMGen inputs: silence on the user stream, the input forced on Moshi's stream.

    Args:
        slots: the batch (its Mimi codes of silence).
        streams: the stream of each slot.
        codes: the input's Mimi codes [B, n_q, 1].
        live: the slots that step.
        delays: the LM's delays of Moshi's audio codebooks.
    Returns:
        (user stream codes [B, n_q, 1], depformer replace tokens [B, dep_q, 1]).
    """
    B, dep_q = codes.shape[0], len(delays)
    user = torch.zeros_like(codes)
    rep = np.zeros((B, dep_q, 1), dtype=np.int64)
    now = codes[:, :dep_q, 0].cpu().numpy()  # [B, dep_q]
    for b in range(B):
        if live[b]:
            user[b, :, 0] = slots.codec.silence(streams[b].step)
            rep[b, :, 0] = streams[b].moshi_tokens(now[b], delays)
    return user, torch.from_numpy(rep).to(slots.device)


class FileProgress:
    """Each file on the progress hook: seconds done of its length, steps/s, real-time factor.

    Args:
        hook: the progress hook.
    """

    def __init__(self, hook: Progress):
        self.hook = hook

    def start(self, seg: Segment) -> None:
        """The file's first frame is taken (once per file)."""
        if seg.result.info is not None and not seg.progress_started:
            seg.progress_started = True
            self.hook.start(str(seg.result.job.index), seg.result.job.path.name, seg.result.info.seconds)

    def update(self, seg: Segment) -> None:
        """The file's frames fed so far."""
        r = seg.result
        done = min(seg.fed * FRAME_SIZE / SAMPLE_RATE, r.info.seconds)  # STT padding not counted
        self.hook.update(str(r.job.index), done, steps_per_s=round(r.steps / r.wall_seconds, 1) if r.wall_seconds
                         else 0.0, rtf=round(r.wall_seconds / max(done, 1e-9), 3))

    def finish(self, res: FileResult) -> None:
        """The file's result is complete."""
        self.hook.finish(str(res.job.index), steps=res.steps, rtf=round(res.realtime_factor, 3))
