"""`ttt infer`: offline streaming inference over audio files through Mimi and moshi's `LMGen` (SPEC §5.1)."""

from __future__ import annotations

import array
import bisect
import errno
import json
import math
import time
import typing as tp
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import FRAME_SIZE, SAMPLE_RATE, WHOLE_FILE_SECONDS, AudioInfo, FrameSource, WavStream, open_frames
from .units import FRAME_RATE
from .errors import ConfigError, InputError, TTTError, WriteError
from .io import shown
from .progress import NullProgress, Progress
from .seed import set_seed

MODES = ("auto", "dialog", "transcribe", "stt")
RESET_POLICIES = ("file", "carry")
DEFAULT_SEED = 4242  # the seed `python -m moshi.run_inference` uses
DEFAULT_OUT = "out"
# moshi's LMGen defaults, used when neither the options nor the checkpoint's lm_gen_config say.
LMGEN_DEFAULTS = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
LAST_WORD_MAX_SECONDS = 1.0  # an STT word never closed by an end-of-padding token ends at most this late
PROGRESS_EVERY = 5  # ticks between progress updates
# Cumulative telemetry counters (SPEC §3.7): a batch slot keeps them across the files it plays, so
# results report them from the stream's start, as if the stream had the slot alone.
COUNTERS = ("updates", "resets", "clip_events", "nonfinite_events")


@dataclass
class InferOptions:
    """What `ttt infer` runs (the CLI options, parsed).

    Args:
        mode: auto | dialog | transcribe | stt (SPEC §5.1).
        channel: take this input channel instead of mixing down.
        batch_size: streams run together, each with its own fast weights.
        reset_policy: `file` (each file a fresh stream) or `carry` (the files in order as one stream).
        temp, temp_text, top_k, top_k_text: sampling; None = the checkpoint's `lm_gen_config`, then moshi's.
        greedy: argmax sampling (deterministic).
        seed: random seed.
        init_state: fast-weight snapshot every stream starts from.
        save_state: where to write each stream's fast weights at its end (a file for one stream,
            else a directory of `<stem>.end.safetensors`).
        force: restore an `init_state` despite forceable differences (another lr or clip).
        telemetry: a directory for each file's update series (`<stem>.updates.csv`/`.png`, SPEC §3.7).
        whole_file_seconds: files up to this long are decoded whole as moshi.run_inference does;
            longer ones in bounded pieces (`ttt_cli.audio.open_frames`).
        pad_seconds: silence (before, after) each file, replacing the mode's own padding (None: STT's
            `stt_config` padding in stt mode, none otherwise). Word times are counted from the end of
            the silence before.
        reset_every_steps: reset every stream's fast weights (not its attention) before its LMGen
            steps N, 2N, ... (counted from the stream's first step; None: never inside a stream).
    """

    mode: str = "auto"
    channel: int | None = None
    batch_size: int = 1
    reset_policy: str = "file"
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    greedy: bool = False
    seed: int = DEFAULT_SEED
    init_state: Path | None = None
    save_state: Path | None = None
    force: bool = False
    telemetry: Path | None = None
    whole_file_seconds: float = WHOLE_FILE_SECONDS
    pad_seconds: tuple[float, float] | None = None
    reset_every_steps: int | None = None


@dataclass
class Job:
    """One input file and the stem its outputs are named after."""

    index: int
    path: Path
    stem: str


@dataclass
class Token:
    step: int     # LM step (80 ms) counted from the file's start
    time: float   # seconds on the file's timeline (see docs/infer.md)
    id: int
    piece: str


@dataclass
class Word:
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

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]


# -- planning --------------------------------------------------------------------------------------

def plan_jobs(paths: tp.Sequence[str | Path]) -> list[Job]:
    """Names each input's outputs: `<stem>`, or `<parent>_<stem>` when several inputs share a stem.

    Names are unique (compared case-insensitively, for file systems that fold case): a name still
    taken gets `_2`, `_3`, ... so that two inputs never write the same output.

    Args:
        paths: input paths in command-line order.
    """
    paths = [Path(p) for p in paths]
    stems = [p.stem or p.name for p in paths]
    count: dict[str, int] = {}
    for s in stems:
        count[s.lower()] = count.get(s.lower(), 0) + 1
    names = [f"{p.parent.name or 'root'}_{s}" if count[s.lower()] > 1 else s for p, s in zip(paths, stems)]
    taken: set[str] = set()
    out = []
    for i, (p, n) in enumerate(zip(paths, names)):
        name, k = n, 1
        while name.lower() in taken:  # same parent name too, or a stem equal to another's new name
            k += 1
            name = f"{n}_{k}"
        taken.add(name.lower())
        out.append(Job(i, p, name))
    return out


def output_paths(out_dir: Path, job: Job, mode: str, telemetry: Path | None = None) -> dict[str, Path]:
    """The files one input writes (with `telemetry`, its update series `updates_csv`, `updates_png` there)."""
    d = {"txt": out_dir / f"{job.stem}.txt", "json": out_dir / f"{job.stem}.json"}
    if mode == "dialog":
        d["wav"] = out_dir / f"{job.stem}.wav"
    if telemetry is not None:
        from .telemetry import series_paths
        d.update({f"updates_{k}": p for k, p in series_paths(telemetry, job.stem).items()})
    return d


def state_paths(save_state: Path | None, jobs: list[Job], reset_policy: str) -> dict[int, Path]:
    """{index of a stream's last job: snapshot path}; one stream writes `save_state` itself (or
    `<stem>.end.safetensors` inside it when it is an existing directory), several streams a directory."""
    if save_state is None or not jobs:
        return {}
    if reset_policy == "carry" or len(jobs) == 1:
        last = jobs[-1]
        if Path(save_state).is_dir():
            return {last.index: Path(save_state) / f"{last.stem}.end.safetensors"}
        return {last.index: Path(save_state)}
    return {j.index: Path(save_state) / f"{j.stem}.end.safetensors" for j in jobs}


def resolve_mode(model, mode: str) -> str:
    """`auto` -> `stt` for checkpoints without a depformer, else `dialog`; wrong mode -> ConfigError."""
    lm = model.lm
    if mode not in MODES:
        raise ConfigError(f"--mode {mode}: expected one of {', '.join(MODES)}.")
    dep_q, user_q = lm.dep_q, lm.n_q - lm.dep_q
    if mode == "auto":
        mode = "stt" if dep_q == 0 else "dialog"
    if mode in ("dialog", "transcribe") and dep_q == 0:
        raise ConfigError(f"--mode {mode} needs a checkpoint with a depformer (Moshi's own audio stream); "
                          f"{model.model_id} has dep_q = 0, a speech-to-text checkpoint: use --mode stt (or auto).")
    if mode == "stt" and dep_q > 0:
        raise ConfigError(f"--mode stt is for speech-to-text checkpoints (dep_q = 0, like kyutai's STT models); "
                          f"{model.model_id} has a depformer (dep_q = {dep_q}): use --mode transcribe for a "
                          f"transcript from Moshi's text stream, or --mode dialog.")
    need = dep_q if mode == "transcribe" else user_q
    if need < 1 or model.mimi.num_codebooks < need:
        raise ConfigError(f"--mode {mode} needs {need} Mimi codebooks on the input stream; {model.model_id} "
                          f"has Mimi with {model.mimi.num_codebooks} and an LM with n_q = {lm.n_q}, dep_q = {dep_q}.")
    provider = getattr(lm, "condition_provider", None)
    if provider is not None and getattr(provider, "conditioners", None):
        raise ConfigError(f"{model.model_id} is a conditioned model (e.g. Hibiki); `ttt infer` runs "
                          f"unconditioned Moshi and STT checkpoints only.")
    return mode


def sampling_settings(model, opts: InferOptions) -> dict:
    """The sampling LMGen runs with: options, else the checkpoint's lm_gen_config, else moshi's defaults."""
    cfg = dict(getattr(model.info, "lm_gen_config", None) or {})
    out: dict[str, tp.Any] = {"use_sampling": not opts.greedy}
    for k, default in LMGEN_DEFAULTS.items():
        v = getattr(opts, k)
        out[k] = v if v is not None else cfg.get(k, default)
    for k in ("temp", "temp_text"):
        if not (isinstance(out[k], (int, float)) and math.isfinite(out[k]) and out[k] >= 0):
            raise ConfigError(f"--{k.replace('_', '-')} must be a number >= 0, got {out[k]!r}.")
        out[k] = float(out[k])
    for k in ("top_k", "top_k_text"):
        if not isinstance(out[k], int) or out[k] < 0:
            raise ConfigError(f"--{k.replace('_', '-')} must be an integer >= 0, got {out[k]!r}.")
    return out


def ttt_summary(model) -> dict:
    """The TTT config the run uses, for outputs."""
    cfg = model.ttt
    on = cfg is not None and bool(cfg.layers) and cfg.rate > 0
    return {"enabled": on, "config": cfg.to_dict() if cfg is not None else None,
            "origin": model.config.get("ttt_origin")}


def validate_options(opts: InferOptions, n_inputs: int) -> None:
    if opts.reset_policy not in RESET_POLICIES:
        raise ConfigError(f"--reset-policy {opts.reset_policy}: expected file or carry.")
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {opts.batch_size}.")
    if opts.reset_policy == "carry" and opts.batch_size != 1:
        raise ConfigError("--reset-policy carry plays the files in order as one continuous stream: it runs "
                          "with --batch-size 1.")
    if opts.channel is not None and opts.channel < 0:
        raise ConfigError(f"--channel must be >= 0, got {opts.channel}.")
    if not (opts.whole_file_seconds >= 0 and math.isfinite(opts.whole_file_seconds)):
        raise ConfigError(f"--whole-file-seconds must be a number of seconds >= 0, got {opts.whole_file_seconds}.")
    if opts.pad_seconds is not None and not all(v >= 0 and math.isfinite(v) for v in opts.pad_seconds):
        raise ConfigError(f"padding must be seconds >= 0, got {opts.pad_seconds}.")
    if opts.reset_every_steps is not None and opts.reset_every_steps < 1:
        raise ConfigError(f"fast-weight resets every {opts.reset_every_steps} steps: the period must be >= 1 step.")
    if n_inputs < 1:
        raise ConfigError("give at least one audio file.")


def preflight(model, opts: InferOptions, n_inputs: int) -> tuple[str, dict]:
    """Every check that needs no audio: options, mode for the checkpoint, sampling, state options.

    Returns:
        (resolved mode, sampling settings).
    """
    validate_options(opts, n_inputs)
    mode = resolve_mode(model, opts.mode)
    sampling = sampling_settings(model, opts)
    cfg = model.ttt
    if (opts.init_state is not None or opts.save_state is not None) and not (cfg and cfg.layers):
        raise ConfigError("--init-state / --save-state need a model with TTT layers; this run has none "
                          "(--ttt-layers selects them).")
    return mode, sampling


# -- streaming core --------------------------------------------------------------------------------

class _Segment:
    """One input file inside a stream; what it produced is kept compactly (int64 arrays), and its
    decoded voice goes to `sink` as it comes when one is given, so memory stays flat in its length."""

    def __init__(self, job: Job, mode: str):
        self.result = FileResult(job, mode)
        self.source: FrameSource | None = None
        self.sink: WavStream | None = None
        self.start_frame = 0      # stream frame index of its first frame
        self.n_frames = 0
        self.fed = 0
        self.finalized = False
        self.telemetry_taken = False
        self.out_steps = array.array("q")    # stream steps of the outputs attributed to it
        self.out_text = array.array("q")
        self.out_audio = array.array("q")    # [n * dep_q] Moshi's audio tokens, step-major
        self.out_pcm: list[np.ndarray] = []  # decoded voice when there is no sink

    def add_pcm(self, pcm: np.ndarray) -> None:
        if self.sink is None:
            self.out_pcm.append(pcm)
            return
        try:
            self.sink.write(pcm)
        except Exception as e:
            from .io import as_os_error, describe_os_error
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


class _Stream:
    """Files played through one batch slot: one file (`--reset-policy file`) or all of them (`carry`)."""

    def __init__(self, jobs: list[Job], mode: str, channel: int | None, pads: tuple[int, int],
                 whole_file_seconds: float = WHOLE_FILE_SECONDS,
                 audio_out: tp.Callable[[Job], WavStream] | None = None):
        self.pending = deque(jobs)
        self.mode = mode
        self.channel = channel
        self.pads = pads
        self.whole_file_seconds = whole_file_seconds
        self.audio_out = audio_out if mode == "dialog" else None
        self.segments: list[_Segment] = []
        self.cur: _Segment | None = None
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
            new = _Segment(job, self.mode)
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

    def segment_for(self, s: int) -> _Segment:
        """The file an output of stream step s belongs to: the one holding the last frame heard, s - 1."""
        f = max(s - 1, 0)
        starts = [g.start_frame for g in self.segments]
        return self.segments[max(bisect.bisect_right(starts, f) - 1, 0)]


def special_ids(model) -> set[int]:
    """Text ids that are not text: padding, end of padding, sentencepiece control symbols."""
    tok, lm = model.tokenizer, model.lm
    ids = {lm.text_padding_token_id, lm.end_of_text_padding_id}
    ids |= {i for i in range(tok.get_piece_size()) if tok.is_control(i)}
    return ids


def text_words(model, steps: list[int], ids: list[int], offset: float, n_steps: int, stt: bool,
               start_step: int = 0, special: set[int] | None = None) -> tuple[list[Token], list[Word]]:
    """Tokens (padding dropped) and words with times, from one file's text stream.

    Args:
        model: the TTTModel (tokenizer, padding ids).
        steps, ids: stream step and text token of every output step.
        offset: seconds subtracted from `step × 0.08` (STT: silence prefix + audio delay).
        n_steps: the file's frames, padding included (bounds an unfinished last STT word).
        stt: word ends from the end-of-padding tokens (kyutai STT), else from the text stream's timing.
        start_step: the file's first stream frame (carry), subtracted from steps.
        special: ids to drop (default `special_ids(model)`).
    """
    tok = model.tokenizer
    special = special_ids(model) if special is None else special
    epad = model.lm.end_of_text_padding_id

    def t(step: float) -> float:
        return round(max(0.0, step / FRAME_RATE - offset), 4)

    tokens: list[Token] = []
    groups: list[list[Token]] = []
    epads: list[int] = []
    for s, i in zip(steps, ids):
        rel = s - start_step
        if i == epad:
            epads.append(rel)
        if i in special:
            continue
        piece = tok.id_to_piece(int(i))
        tk = Token(rel, t(rel), int(i), piece)
        tokens.append(tk)
        if piece.startswith("▁") or not groups:
            groups.append([tk])
        else:
            groups[-1].append(tk)
    words: list[Word] = []
    groups = [g for g in groups if tok.decode([x.id for x in g]).strip()]
    for n, g in enumerate(groups):
        first, last = g[0].step, g[-1].step
        nxt = groups[n + 1][0].step if n + 1 < len(groups) else None
        if stt:
            k = bisect.bisect_right(epads, last)
            if k < len(epads) and (nxt is None or epads[k] <= nxt):
                end: float = epads[k]
            elif nxt is not None:
                end = nxt
            else:
                end = min(float(n_steps), first + LAST_WORD_MAX_SECONDS * FRAME_RATE)
        else:
            end = last + 1
        words.append(Word(tok.decode([x.id for x in g]).strip(), t(first), t(end), first, end))
    return tokens, words


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
    import torch

    jobs = list(paths) if paths and isinstance(paths[0], Job) else plan_jobs(paths)  # type: ignore[arg-type]
    mode, sampling = preflight(model, opts, len(jobs))
    progress = progress or NullProgress()
    ttt = ttt_summary(model)
    init_state = None
    if opts.init_state is not None:
        from .state import FastWeightState, check_fits, load_state
        init_state = load_state(opts.init_state)
        if init_state.has_attention:
            # infer starts new LMGen streams: only the fast weights carry over (SPEC §5.0 semantics).
            init_state = FastWeightState({k: v for k, v in init_state.tensors.items() if k.startswith("layers.")},
                                         {**init_state.meta, "attention": False, "attention_state": None})
        check_fits(model.lm, init_state).raise_unless_fits(opts.force, flag="--force-state")
    streams = [[j] for j in jobs] if opts.reset_policy == "file" else [jobs]
    B = min(opts.batch_size, len(streams))
    run = InferRun(mode=mode, model=_model_facts(model), ttt=ttt, sampling=sampling, seed=opts.seed,
                   batch_size=B, reset_policy=opts.reset_policy,
                   init_state=str(opts.init_state) if opts.init_state else None, results=[],
                   telemetry=str(opts.telemetry) if opts.telemetry is not None else None)
    results: dict[int, FileResult] = {}

    def deliver(res: FileResult) -> None:
        results[res.job.index] = res
        if on_result is not None:
            on_result(res, run)

    set_seed(opts.seed)
    with torch.no_grad():
        _Runner(model, mode, opts, sampling, B, progress, deliver, init_state, audio_out).run(streams)
    run.results = [results[j.index] for j in jobs]
    return run


def _model_facts(model) -> dict:
    return {"id": model.model_id, "model_type": getattr(model.info, "model_type", None),
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "dep_q": int(model.lm.dep_q), "n_q": int(model.lm.n_q), "delays": list(model.lm.delays),
            "provenance": model.config.get("provenance")}


class _MimiStreams:
    """Mimi for B slots, one stream at a time, each slot with its own streaming state.

    Mimi's convolutions and quantizer are not bit-identical across batch sizes (a 1e-7 latent
    difference flips a nearest-codebook choice), and a file must give the same codes in a batch as
    alone; so each slot keeps a single-stream state (encoder and decoder), swapped in for its call.
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
        import torch
        while len(self._silence_codes) <= t:  # streams advance one frame per tick: at most one encode
            if self._silence_state is None:
                self._silence_state = self._fresh()
            x = torch.zeros(1, 1, FRAME_SIZE, device=self.device)
            self._silence_codes.append(self._run(self._silence_state, self.mimi.encode, x)[0, :, 0])
        return self._silence_codes[t]


class _Runner:
    """The batched streaming loop: one tick encodes one frame per live slot and steps LMGen."""

    def __init__(self, model, mode: str, opts: InferOptions, sampling: dict, B: int, progress: Progress,
                 deliver: tp.Callable[[FileResult], None], init_state,
                 audio_out: tp.Callable[[Job], WavStream] | None = None):
        from .fastweights.graphs import TTTLMGen

        self.m, self.mode, self.opts, self.B = model, mode, opts, B
        self.audio_out = audio_out
        self.progress, self.deliver, self.init_state = progress, deliver, init_state
        self.lm = model.lm
        self.mimi = model.mimi
        self.device = self.lm.device
        # moshi's LMGen with one CUDA graph per step phase: graphs stay on with TTT on (SPEC §8.6).
        self.lm_gen = TTTLMGen(self.lm, support_out_of_sync=True, **sampling)
        self.max_delay = max(self.lm.delays)
        self.dep_q = self.lm.dep_q
        self.moshi_delays = list(self.lm.delays[1:1 + self.dep_q])
        self.double_feed = mode != "transcribe"
        stt = dict(getattr(model.info, "stt_config", None) or {}) if mode == "stt" else {}
        stt_delay = float(stt.get("audio_delay_seconds", 0.0))
        if opts.pad_seconds is not None:
            before, after = opts.pad_seconds
        elif mode == "stt":  # moshi.run_inference's STT padding
            before, after = float(stt.get("audio_silence_prefix_seconds", 0.0)), stt_delay + 1.0
        else:
            before, after = 0.0, 0.0
        self.pads = (int(before * SAMPLE_RATE), int(after * SAMPLE_RATE))
        # Word times: seconds from the end of the silence before; STT text lags its audio by the delay.
        self.time_offset = before + stt_delay
        self.special = special_ids(model)
        self.slots: list[_Stream | None] = [None] * B
        self.ticks = 0
        self._lm_mask: list[bool] | None = None
        self.codec = _MimiStreams(self.mimi, B, self.device)

    # -- exec masks ---------------------------------------------------------------------------------
    def _mask(self, bits: list[bool]):
        import torch
        return torch.tensor(bits, dtype=torch.bool, device=self.device)

    def _set_lm_mask(self, bits: list[bool]) -> None:
        if bits != self._lm_mask:
            self.lm_gen.set_exec_mask(self._mask(bits))
            self._lm_mask = list(bits)

    # -- stream lifecycle ---------------------------------------------------------------------------
    def _start(self, b: int, stream: _Stream) -> None:
        """Fresh state for slot b: LMGen and LM (attention, fast weights) reset for b only, a new Mimi state."""
        bits = [i == b for i in range(self.B)]
        self.lm_gen.reset_streaming(self._mask(bits))
        self._lm_mask = None  # a reset sets the item's exec mask to True
        self.codec.start(b)
        if self.init_state is not None:
            from .state import restore
            restore(self.lm, self.init_state, batch_index=b, force=self.opts.force)
        if self.opts.telemetry is not None:
            from .telemetry import take_rows
            take_rows(self.lm, b)  # the slot's earlier stream and this start: the new file's series starts here
        self.slots[b] = stream
        stream.baseline = self._telemetry(b)

    def _telemetry(self, b: int, since: dict[int, dict] | None = None) -> dict[int, dict]:
        """Per-layer telemetry of slot b; counters counted from `since` (the stream's start)."""
        from .fastweights.attach import ttt_layers
        out = {i: dict(layer.telemetry(b)) for i, layer in ttt_layers(self.lm).items()}
        for i, tel in out.items():
            base = (since or {}).get(i, {})
            for k in COUNTERS:
                if k in tel and k in base:
                    tel[k] -= base[k]
        return out

    def _end(self, b: int) -> None:
        stream = self.slots[b]
        assert stream is not None
        state = None
        if self.opts.save_state is not None and stream.segments:
            from .state import capture
            state = capture(self.m, batch_index=b)
        for seg in stream.segments:
            if not seg.finalized:
                self._finalize(stream, seg, state if seg is stream.segments[-1] else None)
        self.slots[b] = None

    def _finalize(self, stream: _Stream, seg: _Segment, state=None) -> None:
        seg.finalized = True
        res = seg.result
        res.state = state
        if res.error is not None:  # failed part-way (seg.fail): nothing of it is kept
            self.deliver(res)
            return
        res.first_step = (seg.out_steps[0] - seg.start_frame) if seg.out_steps else 0
        res.text_ids = seg.out_text.tolist()
        if self.dep_q and seg.out_audio:
            res.audio_codes = np.frombuffer(seg.out_audio, np.int64).reshape(-1, self.dep_q).T.copy()  # [dep_q, n]
        if self.mode == "dialog":
            if seg.sink is not None:
                seg.sink.finish()
                res.audio_stream, seg.sink = seg.sink, None
            else:
                res.audio = np.concatenate(seg.out_pcm) if seg.out_pcm else np.zeros(0, np.float32)
        ids = [i for i in res.text_ids if i not in self.special]
        res.text = self.m.tokenizer.decode(ids).strip() if ids else ""
        res.tokens, res.words = text_words(self.m, seg.out_steps, res.text_ids, self.time_offset,
                                           seg.n_frames, self.mode == "stt", seg.start_frame, self.special)
        res.stream = {"start_step": seg.start_frame, "paths": [str(s.result.job.path) for s in stream.segments]}
        self.progress.finish(str(res.job.index), steps=res.steps,
                             rtf=round(res.realtime_factor, 3))
        self.deliver(res)

    def _begin_segment_progress(self, seg: _Segment) -> None:
        if seg.result.info is not None and not getattr(seg, "_progress", False):
            seg._progress = True  # type: ignore[attr-defined]
            self.progress.start(str(seg.result.job.index), seg.result.job.path.name, seg.result.info.seconds)

    # -- main loop ----------------------------------------------------------------------------------
    def run(self, streams: list[list[Job]]) -> None:
        import torch

        from .telemetry import recording

        queue = deque(_Stream(s, self.mode, self.opts.channel, self.pads, self.opts.whole_file_seconds,
                              self.audio_out) for s in streams)
        try:
            with recording(self.lm, self.opts.telemetry is not None), self.lm_gen.streaming(self.B):
                self._loop(queue, torch)
        except BaseException:  # a failure or Ctrl-C: no generated audio of an unfinished file stays
            for stream in self.slots:
                for seg in (stream.segments if stream is not None else ()):
                    if seg.sink is not None:
                        seg.sink.discard()
            raise

    def _loop(self, queue: deque, torch) -> None:
        """Ticks until every stream has ended: each tick takes one frame per live slot, refilling free slots."""
        while True:
            frames: list[np.ndarray | None] = [None] * self.B
            new = [False] * self.B
            for b in range(self.B):
                while True:
                    stream = self.slots[b]
                    if stream is None:
                        if not queue:
                            break
                        stream = queue.popleft()
                        self._start(b, stream)
                        new[b] = True
                    frame = stream.next_frame()
                    for res in stream.failed:
                        self.deliver(res)
                    stream.failed.clear()
                    if frame is not None:
                        frames[b] = frame
                        if stream.cur is not None:
                            self._begin_segment_progress(stream.cur)
                        break
                    self._end(b)  # input over: the stream stops, as in moshi.run_inference
                    new[b] = False
            live = [f is not None for f in frames]
            if not any(live):
                break
            self._tick(frames, live, new, torch)

    def _tick(self, frames, live: list[bool], new: list[bool], torch) -> None:
        t0 = time.perf_counter()
        B = self.B
        codes = torch.zeros(B, self.mimi.num_codebooks, 1, dtype=torch.long, device=self.device)
        for b, f in enumerate(frames):
            if f is not None:
                x = torch.from_numpy(np.ascontiguousarray(f)).to(self.device)[None, None]  # [1, 1, FRAME_SIZE]
                codes[b] = self.codec.encode(b, x)[0]  # [n_q, 1]
        replace = None
        if self.mode == "transcribe":
            user = torch.zeros_like(codes)
            for b in range(B):
                if live[b]:
                    user[b, :, 0] = self.codec.silence(self.slots[b].step)
            replace = self._replace_tokens(codes, live)
        else:
            user = codes
        if self.double_feed and any(n and l for n, l in zip(new, live)):
            # moshi.run_inference feeds the first frame twice, else the initial token hides it.
            self._set_lm_mask([n and l for n, l in zip(new, live)])
            self._periodic_resets([n and l for n, l in zip(new, live)])
            self.lm_gen.step(user)
            for b in range(B):
                if new[b] and live[b]:
                    self.slots[b].step += 1
        self._set_lm_mask(live)
        self._periodic_resets(live)
        out = self.lm_gen.step(user, depformer_replace_tokens=replace)  # [B, 1 + dep_q, 1]
        out_cpu = out[:, :, 0].cpu()
        valid = [live[b] and bool((out_cpu[b] >= 0).all()) for b in range(B)]
        pcm: dict[int, np.ndarray] = {}
        if self.mode == "dialog":  # Moshi's voice, decoded as it goes
            for b in range(B):
                if valid[b]:
                    y = self.codec.decode(b, out[b:b + 1, 1:])  # [1, 1, FRAME_SIZE]
                    pcm[b] = y[0, 0].float().cpu().numpy()
        dt = time.perf_counter() - t0
        self.ticks += 1
        for b in range(B):
            stream = self.slots[b]
            if not live[b] or stream is None:
                continue
            o = stream.step
            stream.step += 1
            cur = stream.cur
            cur.result.steps += 2 if new[b] and self.double_feed else 1
            cur.result.wall_seconds += dt
            if valid[b]:
                s = o - self.max_delay
                seg = stream.segment_for(s)
                seg.out_steps.append(s)
                seg.out_text.append(int(out_cpu[b, 0]))
                if self.dep_q:
                    seg.out_audio.extend(out_cpu[b, 1:].tolist())
                if b in pcm and seg.result.error is None:
                    seg.add_pcm(pcm[b])
                # outputs arrive in step order: files before `seg` have all theirs now
                for older in stream.segments:
                    if older is seg:
                        break
                    if not older.finalized:
                        self._finalize(stream, older)
            if cur.fed == cur.n_frames and not cur.telemetry_taken:
                cur.telemetry_taken = True
                cur.result.telemetry = self._telemetry(b, stream.baseline)
                cur.result.slot = b
                if self.opts.telemetry is not None:  # one device read per file
                    from .telemetry import take_rows
                    cur.result.updates = take_rows(self.lm, b)
            if self.ticks % PROGRESS_EVERY == 0 or cur.fed == cur.n_frames:
                r = cur.result
                done = min(cur.fed * FRAME_SIZE / SAMPLE_RATE, r.info.seconds)  # STT padding not counted
                self.progress.update(str(r.job.index), done,
                                     steps_per_s=round(r.steps / r.wall_seconds, 1) if r.wall_seconds else 0.0,
                                     rtf=round(r.wall_seconds / max(done, 1e-9), 3))

    def _periodic_resets(self, stepping: list[bool]) -> None:
        """`reset_every_steps`: fast weights (not attention) of the streams about to take step N, 2N, ... reset."""
        n = self.opts.reset_every_steps
        if not n:
            return
        bits = [stepping[b] and self.slots[b] is not None and self.slots[b].step > 0 and self.slots[b].step % n == 0
                for b in range(self.B)]
        if any(bits):
            from .fastweights.attach import ttt_layers
            mask = self._mask(bits)
            for layer in ttt_layers(self.lm).values():
                layer.reset_streaming(mask)

    def _replace_tokens(self, codes, live: list[bool]):
        """Moshi-stream tokens in LMGen's delayed layout: at step t, codebook k carries frame t - delay_k."""
        import torch
        B = self.B
        now = codes[:, :self.dep_q, 0].cpu().numpy()  # [B, dep_q]
        rep = np.zeros((B, self.dep_q, 1), dtype=np.int64)
        keep = max(self.moshi_delays) + 1
        for b in range(B):
            stream = self.slots[b]
            if not live[b] or stream is None:
                continue
            stream.history.append(now[b])
            while len(stream.history) > keep:
                stream.history.popleft()
            t = stream.step  # this frame's index in the stream (no double feed in transcribe)
            n = len(stream.history)
            for k, d in enumerate(self.moshi_delays):
                if t - d >= 0:  # earlier positions are replaced by the initial token anyway
                    rep[b, k, 0] = stream.history[n - 1 - d][k]
        return torch.from_numpy(rep).to(self.device)


# -- outputs ---------------------------------------------------------------------------------------

def result_json(res: FileResult, run: InferRun) -> dict:
    """The `<stem>.json` object of one input (schema in docs/infer.md)."""
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
    if run.distributed is not None:
        d["distributed"] = run.distributed
    if run.reset_policy == "carry":
        d["stream"] = {"start_step": res.stream.get("start_step", 0),
                       "start_seconds": res.stream.get("start_step", 0) / FRAME_RATE}
    if res.state is not None or "state" in res.outputs:
        d["state_out"] = res.outputs.get("state")
    return d


def output_recognisers(out_dir: Path, job: Job, mode: str) -> dict[str, tp.Callable[[Path], bool]]:
    """How an existing output of an earlier `ttt infer` run is recognised (replaceable with --overwrite):
    `<stem>.json` is a result object, and it names the other files among its `outputs`."""
    from .outputs import json_with_keys, named_in
    paths = output_paths(out_dir, job, mode)
    record = json_with_keys("input", "mode", "outputs")
    return {k: (record if k == "json" else named_in(paths["json"], record)) for k in paths}


def plan_outputs(plan, out_dir: Path, jobs: list[Job], mode: str | None, states: dict[int, Path],
                 kinds: tp.Collection[str] = ("txt", "json", "wav", "updates"), telemetry: Path | None = None) -> None:
    """Declares the outputs of an infer run on an `OutputPlan` (mode None: not known yet, no .wav).

    Args:
        plan: the run's OutputPlan.
        out_dir: --out.
        jobs: the planned inputs.
        mode: the resolved mode, or None before the model is loaded.
        states: --save-state paths by job index.
        kinds: which per-input outputs to declare (e.g. only "wav" once the mode is known).
        telemetry: the --telemetry directory (the update series of each input).
    """
    from .outputs import safetensors_with_metadata
    if telemetry is not None and "updates" in kinds:
        from .telemetry import FLAG, plan_series, series_paths
        plan.write_into(telemetry, FLAG)
        for j in jobs:
            plan_series(plan, series_paths(telemetry, j.stem), j.path.name)
    for j in jobs:
        rec = output_recognisers(out_dir, j, mode or "transcribe")
        for k, p in output_paths(out_dir, j, mode or "transcribe").items():
            if k in kinds:
                plan.write(p, "--out", f"the .{k} output of {j.path.name}", rec[k])
    for i, p in states.items():
        plan.write(p, "--save-state", "a fast-weight snapshot", safetensors_with_metadata("ttt_state"))


def write_result(res: FileResult, run: InferRun, out_dir: Path, state_path: Path | None = None,
                 overwrite: bool = False) -> None:
    """Writes `<stem>.txt`, `<stem>.wav` (dialog), the snapshot and `<stem>.json` as one unit.

    Each file is written atomically and read back; `<stem>.json` comes last, so it exists only when
    the rest does. On any failure (a full disk, Ctrl-C, a file that does not read back) the files of
    this result already written are removed again and the error propagates: an OSError becomes a
    WriteError naming the path, which stops the run (the inputs not yet written are reported as not
    run); the outputs of earlier inputs stay.
    """
    from .io import as_os_error, describe_os_error, write_text

    if not res.ok:
        if res.audio_stream is not None:
            res.audio_stream.discard()
        return
    paths = output_paths(out_dir, res.job, run.mode)
    series = None
    if run.telemetry is not None:
        from .telemetry import series_paths
        series = series_paths(Path(run.telemetry), res.job.stem)
    written: list[Path] = []
    current: Path | None = None
    try:
        current = paths["txt"]
        write_text(paths["txt"], res.text + "\n")
        written.append(paths["txt"])
        if paths["txt"].read_text(encoding="utf-8") != res.text + "\n":
            raise OSError(errno.EIO, "does not read back as written", str(paths["txt"]))
        res.outputs["txt"] = str(paths["txt"])
        if "wav" in paths:
            current = paths["wav"]
            expected = _write_wav(res, paths["wav"])
            written.append(paths["wav"])
            _check_wav(paths["wav"], expected)
            res.outputs["wav"] = str(paths["wav"])
        if state_path is not None and res.state is not None:
            from .state import save_state
            current = state_path
            meta = {"source_files": [str(res.job.path)] if run.reset_policy == "file" else res.stream.get("paths", []),
                    "reset_policy": run.reset_policy, "command": "infer", "mode": run.mode,
                    "init_state": run.init_state}
            save_state(res.state, state_path, metadata=meta, overwrite=True)  # the plan checked it is ours
            written.append(state_path)
            res.outputs["state"] = str(state_path)
        if series is not None:
            from .telemetry import write_series
            current = series["csv"]
            written += list(series.values())  # removed again (if there) should a later file fail
            names = write_series(series, res.updates or {}, res.slot, f"{run.model['id']}: {res.job.path.name}")
            res.outputs.update({f"updates_{k}": v for k, v in names.items()})
        current = paths["json"]
        res.outputs["json"] = str(paths["json"])
        obj = result_json(res, run)
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        from .io import write_json
        write_json(paths["json"], obj)
        written.append(paths["json"])
        if json.loads(paths["json"].read_text(encoding="utf-8")) != json.loads(shown(text)):
            raise OSError(errno.EIO, "does not read back as written", str(paths["json"]))
    except BaseException as e:
        for p in written:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                pass
        if res.audio_stream is not None:
            res.audio_stream.discard()
        res.outputs.clear()
        ose = as_os_error(e, current)
        if ose is not None and not isinstance(e, TTTError):
            detail = describe_os_error(ose, current)
            res.error = f"{res.job.path}: {detail}"
            raise WriteError.unit_removed(detail, res.job.path) from None
        raise
    finally:
        res.state = None  # a snapshot can be large: keep it no longer than needed
        res.audio_stream = None


def _write_wav(res: FileResult, path: Path) -> int:
    """Puts the generated voice at `path`: commits the stream written during the run, or writes the
    samples held in memory (atomically either way); returns the number of samples written."""
    import sphn
    from .io import atomic_write

    if res.audio_stream is not None:
        if Path(res.audio_stream.path) != Path(path):
            raise RuntimeError(f"the generated audio was written for {res.audio_stream.path}, not {path}")
        res.audio_stream.commit()
        return res.audio_stream.samples
    audio = np.asarray(res.audio, dtype=np.float32)
    atomic_write(path, lambda p: sphn.write_wav(str(p), audio, SAMPLE_RATE))
    return int(audio.shape[0])


def _check_wav(path: Path, samples: int) -> None:
    """The written .wav's header says 24 kHz mono with `samples` samples (read without loading the data)."""
    import wave
    try:
        with wave.open(str(path), "rb") as w:
            sr, n, ch = w.getframerate(), w.getnframes(), w.getnchannels()
    except (wave.Error, EOFError) as e:
        raise OSError(errno.EIO, f"does not read back as a WAV file ({e})", str(path)) from None
    if (sr, n, ch) != (SAMPLE_RATE, samples, 1):
        raise OSError(errno.EIO, f"does not read back ({n} samples at {sr} Hz, {ch} channel(s); expected {samples} "
                                 f"at {SAMPLE_RATE}, mono)", str(path))
