"""`evaluate_asr`: long-form transcription quality with reset policies side by side (SPEC §5.7); returns an AsrResult.

The run is three separate parts, so that a scale-out can share the middle one across processes:
`setup` (options, data, output plan, model, resume record), `transcribe_pending` (the per-recording
loop: each recording streamed once per policy with `ttt_cli.inference.infer`, its hypotheses
written and the recording committed to the resume record) and `merge` (every committed recording,
this run's and resumed ones, scored against its current reference and summed per policy:
results.json, wer.csv, wer.png).
"""

from __future__ import annotations

import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.errors import ConfigError
from ttt_cli.progress import NullProgress

from .. import resume
from ..policies import Policy, parse_policies
from ..protocol import EvalResult
from .data import AsrDataset, AsrItem, discover_asr
from .metrics import DEFAULT_BIN_SECONDS

MODES = ("auto", "stt", "transcribe")
TRANSCRIBE_TEXT_DELAY = 2.0   # SPEC §5.7: the text delay assumed in `transcribe` mode (seconds)
PAD_BEFORE = 1.0              # kyutai's STT evaluation: 1 s of silence before each file ...
PAD_AFTER_EXTRA = 0.5         # ... and the text delay + 0.5 s after it
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


@dataclass
class PolicyWer:
    """One policy's line of the final table (None: no recording scored)."""

    name: str
    wer: float | None
    wer_mean: float | None
    cer: float | None
    substitutions: int
    deletions: int
    insertions: int
    words: int
    longest_deletion_run: int | None
    longest_gap_s: float | None
    repetition_rate: float | None
    realtime_factor: float | None


class AsrResult(EvalResult):
    """eval librilight's EvalResult: `policies` holds PolicyWer lines, `documents_done`/`_total` count recordings,
    `failed` the inputs skipped because something was wrong ("path: reason")."""


@dataclass
class AsrRun:
    """What one evaluation holds while it runs (built by `setup`)."""

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


# -- options -------------------------------------------------------------------------------------

def parse_asr_policies(texts: tp.Sequence[str] | None) -> list[Policy]:
    """The `-p` values that make sense for recordings: `document`, `every:...`, `off` (docs/asr.md)."""
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
    import math
    from ttt_cli.units import seconds_to_steps

    if o.mode not in MODES:
        raise ConfigError(f"--mode {o.mode}: eval asr transcribes with {', '.join(MODES)} (dialog does not "
                          f"transcribe).")
    if not (o.bin_seconds > 0 and math.isfinite(o.bin_seconds)) or seconds_to_steps(o.bin_seconds) < 1:
        raise ConfigError(f"--bin-seconds must be at least one step (0.08 s), got {o.bin_seconds}.")
    for flag, v in (("--pad-before", o.pad_before), ("--pad-after", o.pad_after),
                    ("--whole-file-seconds", o.whole_file_seconds)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{flag} must be seconds >= 0, got {v}.")
    if o.resume and o.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume continues the run in --out, "
                          "overwrite starts it again.")


def transcription_mode(m, mode: str) -> str:
    """`auto` -> `stt` for checkpoints without a depformer, else `transcribe`; checked against the model."""
    from ttt_cli.infer import resolve_mode
    if mode == "auto":
        mode = "stt" if m.lm.dep_q == 0 else "transcribe"
    return resolve_mode(m, mode)


def text_delay(m, mode: str) -> tuple[float, list[str]]:
    """The model's text delay (seconds): `stt_config.audio_delay_seconds` (stt), 2 s (transcribe); and notes."""
    if mode == "transcribe":
        return TRANSCRIBE_TEXT_DELAY, []
    cfg = dict(getattr(m.info, "stt_config", None) or {})
    if "audio_delay_seconds" not in cfg:
        return 0.0, [f"{m.model_id} has no stt_config.audio_delay_seconds: its text delay is taken as 0 s for the "
                     f"padding after each recording (set --pad-after to pad more)."]
    return float(cfg["audio_delay_seconds"]), []


# -- the run -------------------------------------------------------------------------------------

def evaluate_asr(options: AsrOptions, progress=None, model=None) -> AsrResult:
    """Transcribes every recording of DATA once per policy in streaming mode and scores it (SPEC §5.7).

    Writes into `options.out`: `hyp/<policy dir>/<key>.txt` and `.json` per recording and policy (as
    each finishes), then results.json, wer.csv and wer.png (docs/asr.md).

    Arguments, result and errors as `evals.protocol.evaluate_librilight`'s (recordings for documents):
    `model` may be a loaded TTTModel or a function that loads it once DATA and --out are checked;
    `interrupted` in the AsrResult says Ctrl-C stopped the run (finished recordings kept for --resume).
    """
    from .outputs import plan_outputs

    o = options
    validate(o)
    policies = parse_asr_policies(o.policies)
    dataset = discover_asr(o.data)
    out = Path(o.out)
    plan = plan_outputs(o, dataset, policies, out)
    try:
        run = setup(o, policies, dataset, out, progress or NullProgress(), model)
        interrupted = transcribe_pending(run)
        return merge(run, interrupted)
    finally:
        plan.cleanup()


def setup(o: AsrOptions, policies: list[Policy], dataset: AsrDataset, out: Path, progress, model) -> AsrRun:
    """Loads the model, settles mode and padding, records the protocol and opens (or starts) the resume record."""
    from ..codes_cache import mimi_fingerprint
    from ..protocol import _model_section, _ttt_fingerprint, load_warm_start, obtain_model

    t_start = time.perf_counter()
    m = obtain_model(o, model)
    mode = transcription_mode(m, o.mode)
    delay, notes = text_delay(m, mode)
    pads = (PAD_BEFORE if o.pad_before is None else o.pad_before,
            delay + PAD_AFTER_EXTRA if o.pad_after is None else o.pad_after)
    warm, init_rec = None, None
    if o.init_state is not None:
        warm, init_rec, more = load_warm_start(m, Path(o.init_state), o.force_state)
        notes += more
    protocol = {"policies": [p.name for p in policies], "mode": mode, "pad_before_s": pads[0], "pad_after_s": pads[1],
                "text_delay_s": delay, "whole_file_seconds": o.whole_file_seconds, "bin_seconds": o.bin_seconds,
                "init_state": init_rec, "seed": o.seed, "data": str(Path(dataset.source).resolve()),
                "data_kind": dataset.kind, "sampling": "greedy (argmax text)",
                "reset_every_steps": {p.name: p.interval_steps for p in policies if p.kind == "every"},
                "normalizer": "whisper EnglishTextNormalizer (whisper-normalizer)",
                "scoring": "jiwer on normalised words and characters; corpus = total errors / total reference words"}
    model_rec = _model_section(m, _ttt_fingerprint(m), mimi_fingerprint(m.mimi))
    run = AsrRun(o, policies, dataset, out, m, mode, pads, float(m.ttt.rate) if m.ttt is not None else 0.0, warm,
                 protocol, model_rec, progress, warnings=list(m.warnings) + notes, t_start=t_start)
    open_record(run)
    return run


def open_record(run: AsrRun) -> None:
    """Loads and verifies the resume record (audio content, hypothesis files), or starts one; written at
    once, so that a run interrupted before its first recording finished resumes like any other."""
    from ..protocol import _write_state
    from .outputs import clear_earlier_run

    config = resume.run_config(run.protocol, run.model_rec, ASR_FLAGS)
    sdir = resume.state_dir(run.out)
    if run.o.resume and (sdir / resume.STATE_FILE).is_file():
        run.state, notes = resume.open_state(run.out, config, run.dataset, False, None,
                                             changed=lambda e, it: _changed(run, e, it))
        run.warnings += notes
        run.progress.log(f"resuming: {len(run.state['done'])} of {len(run.dataset.items)} recording(s) already done.")
    else:
        if run.o.resume:
            run.progress.log(f"--resume: nothing to resume in {run.out}; starting a new run.")
        clear_earlier_run(run.out)  # checked to hold only ttt's own files (--overwrite)
        run.state = resume.new_state(config)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        _write_state(sdir, run.state)
    except OSError as e:
        _stop_on_write_error(run, e)


def _changed(run: AsrRun, entry: dict, item: AsrItem) -> str | None:
    """Why a finished recording must be transcribed again (its audio or a hypothesis file changed), or None."""
    from ..codes_cache import digest_or_none

    want = (entry.get("inputs") or {}).get("sha256")
    if digest_or_none(item.audio) != want:
        return "its audio changed"
    for p in (entry.get("policies") or {}).values():
        for name, digest in (p.get("sha256") or {}).items():
            if digest_or_none(run.out / name) != digest:
                return f"its hypothesis file {name} is missing or changed"
    return None


# -- the per-recording loop -------------------------------------------------------------------------

class _Labelled:
    """Progress of one recording and policy: infer's per-file bar, named `[n/N] key (policy)`."""

    def __init__(self, progress, label: str):
        self.p, self.label = progress, label

    def start(self, key, description, total):
        self.p.start(f"asr-{key}", self.label, total)

    def update(self, key, completed, **info):
        self.p.update(f"asr-{key}", completed, **info)

    def finish(self, key, **info):
        self.p.finish(f"asr-{key}", **info)

    def log(self, message):
        self.p.log(message)


def transcribe_pending(run: AsrRun) -> bool:
    """Transcribes every recording not done yet under every policy, committing each to the resume record as
    it finishes; True when Ctrl-C stopped it (the recording in progress leaves nothing behind)."""
    from ..protocol import _write_state

    items = run.dataset.items
    done = set(run.state["done"])
    todo = [it for it in items if it.key not in done]
    run.progress.log(f"transcribing {len(todo)} of {len(items)} recording(s) x {len(run.policies)} policy(ies) "
                     f"({run.mode}): {', '.join(p.name for p in run.policies)}")
    for n, item in enumerate(todo, start=len(done) + 1):
        written: list[Path] = []
        try:
            entry = transcribe_recording(run, item, f"[{n}/{len(items)}] {item.key}", written)
            state = resume.with_document(run.state, item.key, entry)
            _write_state(resume.state_dir(run.out), state)
            run.state = state
        except KeyboardInterrupt:
            _remove(written)
            return True
        except Exception as e:
            _remove(written)
            from ttt_cli.io import as_os_error
            if as_os_error(e) is None:
                raise
            _stop_on_write_error(run, e)
    return False


def transcribe_recording(run: AsrRun, item: AsrItem, label: str, written: list[Path]) -> dict:
    """Streams one recording once per policy, writes its hypotheses; returns its resume entry.

    Args:
        run: the run.
        item: the recording.
        label: its progress label.
        written: receives each file written, so that an interrupted recording can be removed again.
    """
    from ttt_cli.infer import InferOptions, Job, infer, write_result
    from ..codes_cache import digest_or_none, file_digest
    from ..scoring import policy_settings
    from .metrics import score_file
    from .outputs import hyp_dir, hyp_paths, hyp_stem

    entry: dict[str, tp.Any] = {"key": item.key, "inputs": {"sha256": digest_or_none(item.audio)},
                                "policies": {}, "warnings": [], "error": None}
    for p in run.policies:
        opts = InferOptions(mode=run.mode, greedy=True, seed=run.o.seed, pad_seconds=run.pads,
                            whole_file_seconds=run.o.whole_file_seconds,
                            reset_every_steps=p.interval_steps if p.kind == "every" else None)
        with policy_settings(run.m.lm, p.ttt_on, run.lr, run.warm):
            irun = infer(run.m, [Job(0, item.audio, hyp_stem(item.key))], opts, _Labelled(run.progress,
                                                                                             f"{label} ({p.name})"))
        res = irun.results[0]
        if not res.ok:  # a file that cannot be decoded fails alike under every policy
            entry["error"] = res.error.removeprefix(f"{item.audio}: ")
            run.progress.log(f"{label}: skipped: {entry['error']}")
            return entry
        irun.ttt = {**irun.ttt, "enabled": p.ttt_on and run.lr > 0, "policy": p.name}
        paths = hyp_paths(run.out, p.dir_name, item.key)
        written += [paths["txt"], paths["json"]]
        write_result(res, irun, hyp_dir(run.out, p.dir_name))
        rel = {k: paths[k].relative_to(run.out).as_posix() for k in ("txt", "json")}
        entry["policies"][p.name] = {
            **rel, "sha256": {r: file_digest(run.out / r) for r in rel.values()},
            "seconds": res.info.seconds, "wall_seconds": res.wall_seconds, "steps": res.steps,
            "telemetry": {str(i): t for i, t in res.telemetry.items()}}
        entry["warnings"] = list(res.info.warnings)
        entry["info"] = {**res.info.to_dict(), "read": "whole" if res.read_whole else "pieces"}
        s = score_file(item.reference, res.text, res.words, res.info.seconds, run.o.bin_seconds)
        run.progress.log(f"{label} ({res.info.seconds:.1f} s) {p.name}: WER {100 * s.wer:.1f}% "
                         f"({s.errors}/{s.words}), RTF {res.realtime_factor:.3f}")
    return entry


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _stop_on_write_error(run: AsrRun, e: BaseException) -> tp.NoReturn:
    from ..protocol import stop_on_write_error
    stop_on_write_error(run.out, run.state, [it.key for it in run.dataset.items], e, "recording")


# -- merging ---------------------------------------------------------------------------------------

def merge(run: AsrRun, interrupted: bool) -> AsrResult:
    """Scores every committed recording against its current reference, sums per policy, writes the outputs."""
    from .results import build_results, write_outputs

    results, ledger, summaries = build_results(run, interrupted)
    files = write_outputs(run, results)
    failed = [f"{r.path}: {r.reason}" for r in ledger.failed]
    return AsrResult(run.out, results, summaries, files, failed, results["warnings"], interrupted,
                     len(run.state["done"]), len(run.dataset.items))
