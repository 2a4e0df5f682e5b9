"""What `ttt infer` runs: its options, and the checks and settings they resolve to for a model (SPEC §5.1)."""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..audio import SAMPLE_RATE, WHOLE_FILE_SECONDS
from ..errors import ConfigError
from .subtitles import DEFAULT_FORMATS, FORMATS, MAX_LINE_COUNT, MAX_LINE_WIDTH, SUBTITLE_FORMATS, check_limits

MODES = ("auto", "dialog", "transcribe", "stt")
RESET_POLICIES = ("file", "carry")
DEFAULT_SEED = 4242  # the seed `python -m moshi.run_inference` uses
DEFAULT_OUT = "out"
# moshi's LMGen defaults, used when neither the options nor the checkpoint's lm_gen_config say.
LMGEN_DEFAULTS = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


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
        formats: the files written per input, among `txt json srt vtt tsv` (`json` always;
            `ttt_cli.infer.subtitles.parse_formats` reads `--format`).
        max_line_width, max_line_count: how subtitle cues are cut (characters per line, lines per cue);
            None: 42 and 2. Only with a subtitle format (srt, vtt, tsv) among `formats`.
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
    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_line_width: int | None = None
    max_line_count: int | None = None

    def cue_limits(self) -> dict[str, int] | None:
        """{"max_line_width", "max_line_count"} the subtitle cues are cut at, or None without a subtitle format."""
        if not any(f in SUBTITLE_FORMATS for f in self.formats):
            return None
        return {"max_line_width": MAX_LINE_WIDTH if self.max_line_width is None else self.max_line_width,
                "max_line_count": MAX_LINE_COUNT if self.max_line_count is None else self.max_line_count}


def validate_options(opts: InferOptions, n_inputs: int) -> None:
    """The checks that need neither a model nor audio (ConfigError: usage, exit 2).

    Args:
        opts: the options.
        n_inputs: how many audio files were given.
    """
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
    _check_formats(opts)
    if n_inputs < 1:
        raise ConfigError("give at least one audio file.")


def _check_formats(opts: InferOptions) -> None:
    """`formats` known and holding `json`; cue limits only with a subtitle format, and keepable."""
    unknown = [f for f in opts.formats if f not in FORMATS]
    if unknown or "json" not in opts.formats:
        raise ConfigError(f"output formats {', '.join(opts.formats)}: expected some of {', '.join(FORMATS)}, "
                          f"json among them (the record of each input).")
    limits = opts.cue_limits()
    if limits is None:
        given = [f"--max-line-{k}" for k, v in (("width", opts.max_line_width), ("count", opts.max_line_count))
                 if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} shape(s) subtitle cues, but --format asks for none: add srt, "
                              f"vtt or tsv to --format (e.g. --format txt,json,srt), or leave {given[0]} out.")
        return
    check_limits(**limits)


def batch_slots(opts: InferOptions, n_jobs: int) -> int:
    """The batch a run of `n_jobs` files uses: `--batch-size`, at most one slot per stream.

    Args:
        opts: the options (`reset_policy` carry plays every file in one stream).
        n_jobs: the files of the run.
    """
    streams = n_jobs if opts.reset_policy == "file" else 1
    return min(opts.batch_size, streams)


def resolve_mode(model, mode: str) -> str:
    """`auto` -> `stt` for checkpoints without a depformer, else `dialog`; wrong mode -> ConfigError.

    Args:
        model: a TTTModel from `load_model`.
        mode: one of `MODES`.
    """
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
    """The sampling LMGen runs with: options, else the checkpoint's lm_gen_config, else moshi's defaults.

    Args:
        model: a TTTModel (its `info.lm_gen_config`).
        opts: the options.
    """
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


def preflight(model, opts: InferOptions, n_inputs: int) -> tuple[str, dict]:
    """Every check that needs no audio: options, mode for the checkpoint, sampling, state options.

    Args:
        model: a TTTModel from `load_model`.
        opts: the options.
        n_inputs: how many audio files were given.
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


def padding(model, mode: str, opts: InferOptions) -> tuple[tuple[int, int], float]:
    """The silence around each file and where word times start.

    Args:
        model: a TTTModel (its `info.stt_config` in stt mode).
        mode: the resolved mode.
        opts: the options (`pad_seconds` replaces the mode's own padding).
    Returns:
        ((samples before, samples after), seconds subtracted from a step's time for word times: the silence
        before, plus in stt mode the text's delay behind its audio).
    """
    stt = dict(getattr(model.info, "stt_config", None) or {}) if mode == "stt" else {}
    stt_delay = float(stt.get("audio_delay_seconds", 0.0))
    if opts.pad_seconds is not None:
        before, after = opts.pad_seconds
    elif mode == "stt":  # moshi.run_inference's STT padding
        before, after = float(stt.get("audio_silence_prefix_seconds", 0.0)), stt_delay + 1.0
    else:
        before, after = 0.0, 0.0
    return (int(before * SAMPLE_RATE), int(after * SAMPLE_RATE)), before + stt_delay


def ttt_summary(model) -> dict:
    """The TTT config the run uses, for outputs.

    Args:
        model: a TTTModel.
    """
    cfg = model.ttt
    on = cfg is not None and bool(cfg.layers) and cfg.rate > 0
    return {"enabled": on, "config": cfg.to_dict() if cfg is not None else None,
            "origin": model.config.get("ttt_origin")}


def model_facts(model) -> dict:
    """The `model` object of each result: id, type, device, dtype, stream layout and provenance.

    Args:
        model: a TTTModel.
    """
    return {"id": model.model_id, "model_type": getattr(model.info, "model_type", None),
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "dep_q": int(model.lm.dep_q), "n_q": int(model.lm.n_q), "delays": list(model.lm.delays),
            "provenance": model.config.get("provenance")}
