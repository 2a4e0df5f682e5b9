"""`evaluate_asr`: long-form transcription quality, reset policies side by side (SPEC §5.7), an `evals.run` task."""

from __future__ import annotations

from pathlib import Path

from ttt_cli import infer as inference
from ttt_cli.distributed import current
from ttt_cli.outputs import OutputPlan

from .. import resume
from ..inputs import digest_or_none
from ..run import EvalResult, Setup, evaluate
from . import sharded
from .data import AsrItem, discover_asr
from .loop import stop, transcribe_pending
from .options import ASR_FLAGS, AsrOptions, AsrRun, parse_asr_policies, validate
from .outputs import clear_earlier_run, plan_outputs
from .results import merge

TRANSCRIBE_TEXT_DELAY = 2.0   # SPEC §5.7: the text delay assumed in `transcribe` mode (seconds)
PAD_BEFORE = 1.0              # kyutai's STT evaluation: 1 s of silence before each file ...
PAD_AFTER_EXTRA = 0.5         # ... and the text delay + 0.5 s after it


def evaluate_asr(options: AsrOptions, progress=None, model=None) -> EvalResult:
    """Transcribes every recording of DATA once per policy in streaming mode and scores it (SPEC §5.7).

    Writes into `options.out`: `hyp/<policy dir>/<key>.txt` and `.json` per recording and policy (as
    each finishes), then results.json, wer.csv and wer.png (docs/asr.md). The run is three parts, so
    that a scale-out can share the middle one across processes: the driver's setup (options, data,
    output plan, model, provenance) and the resume record (`open_record`), the per-recording loop
    (`evals.asr.loop.transcribe_pending`: each recording streamed once per policy with
    `ttt_cli.infer.infer`, its hypotheses written and the recording committed) and `merge`
    (every committed recording, this run's and resumed ones, scored against its current reference and
    summed per policy: results.json, wer.csv, wer.png).

    Args:
        options: what to run (see AsrOptions).
        progress: a `ttt_cli.progress` hook (None: silent).
        model: a loaded `TTTModel`, or a function that loads it once DATA and --out are checked.
    Returns:
        EvalResult (`policies`: PolicyWer lines, `documents_done`/`_total`: recordings); `interrupted`
        says Ctrl-C stopped the run (finished recordings kept for --resume).
    Raises:
        as `evals.librilight.protocol.evaluate_librilight` (recordings for documents).
    """
    return evaluate(AsrTask(options), options, progress, model)


def transcription_mode(m, mode: str) -> str:
    """`auto` -> `stt` for checkpoints without a depformer, else `transcribe`; checked against the model.

    Args:
        m: the loaded TTTModel.
        mode: --mode.
    """
    if mode == "auto":
        mode = "stt" if m.lm.dep_q == 0 else "transcribe"
    return inference.resolve_mode(m, mode)


def text_delay(m, mode: str) -> tuple[float, list[str]]:
    """The model's text delay (seconds): `stt_config.audio_delay_seconds` (stt), 2 s (transcribe); and notes.

    Args:
        m: the loaded TTTModel.
        mode: the resolved mode (`stt`, `transcribe`).
    """
    if mode == "transcribe":
        return TRANSCRIBE_TEXT_DELAY, []
    cfg = dict(getattr(m.info, "stt_config", None) or {})
    if "audio_delay_seconds" not in cfg:
        return 0.0, [f"{m.model_id} has no stt_config.audio_delay_seconds: its text delay is taken as 0 s for the "
                     f"padding after each recording (set --pad-after to pad more)."]
    return float(cfg["audio_delay_seconds"]), []


class AsrTask:
    """`ttt eval asr` as `evals.run.evaluate` runs it: recordings of DATA transcribed under each policy."""

    def __init__(self, o: AsrOptions):
        self.o = o
        self.out = Path(o.out)
        # Set by `check` (policies, dataset) and `prepare` (what depends on the model).
        self.policies: list = []
        self.dataset = None
        self.mode = o.mode
        self.delay = 0.0
        self.pads = (0.0, 0.0)

    def check(self) -> OutputPlan:
        """Options, policies, the recordings and where the run writes, before the model loads."""
        validate(self.o)
        self.policies = parse_asr_policies(self.o.policies)
        self.dataset = discover_asr(self.o.data)
        return plan_outputs(self.o, self.dataset, self.policies, self.out)

    def prepare(self, m) -> list[str]:
        """Settles the mode (checked against the model) and the padding; notes on the text delay and the data."""
        o = self.o
        self.mode = transcription_mode(m, o.mode)
        self.delay, notes = text_delay(m, self.mode)
        self.pads = (PAD_BEFORE if o.pad_before is None else o.pad_before,
                     self.delay + PAD_AFTER_EXTRA if o.pad_after is None else o.pad_after)
        return notes + list(self.dataset.warnings)  # e.g. a manifest `duration` the audio does not have

    def protocol(self, init_state: dict | None) -> dict:
        """results.json's `protocol` section."""
        o, pads, policies = self.o, self.pads, self.policies
        return {"policies": [p.name for p in policies], "mode": self.mode, "pad_before_s": pads[0],
                "pad_after_s": pads[1], "text_delay_s": self.delay, "whole_file_seconds": o.whole_file_seconds,
                "bin_seconds": o.bin_seconds, "init_state": init_state, "seed": o.seed,
                "data": str(Path(self.dataset.source).resolve()), "data_kind": self.dataset.kind,
                "sampling": "greedy (argmax text)",
                "reset_every_steps": {p.name: p.interval_steps for p in policies if p.kind == "every"},
                "normalizer": "whisper EnglishTextNormalizer (whisper-normalizer)",
                "scoring": "jiwer on normalised words and characters; corpus = total errors / total reference words"}

    def run(self, setup: Setup) -> EvalResult:
        """Opens the resume record, transcribes every recording not done yet, then scores and writes."""
        run = AsrRun(self.o, self.policies, self.dataset, self.out, setup.m, self.mode, self.pads, setup.lr,
                     setup.warm, setup.protocol, setup.model_rec, setup.progress, warnings=setup.warnings,
                     t_start=setup.t_start)
        config = resume.run_config(run.protocol, run.model_rec, ASR_FLAGS)
        if current().active:
            interrupted = sharded.transcribe_shared(run, config, open_record)
            if not current().is_main:  # rank 0 writes the outputs
                return sharded.rank_result(run, interrupted)
        else:
            open_record(run, config)
            interrupted = transcribe_pending(run)
        return merge(run, interrupted)


def open_record(run: AsrRun, config: dict) -> None:
    """Loads and verifies the resume record (audio content, hypothesis files; the records of ranks under
    torchrun included), or starts one; written at once, so that a run interrupted before its first
    recording finished resumes like any other.

    Args:
        run: the run (its `state` is set).
        config: the run's `resume.run_config`.
    """
    sdir = resume.state_dir(run.out)
    if run.o.resume and ((sdir / resume.STATE_FILE).is_file() or resume.ranks_dir(run.out).is_dir()):
        run.state, notes = resume.open_state(run.out, config, run.dataset, False,
                                             lambda e, it: changed(run, e, it))
        run.warnings += notes
        run.progress.log(f"resuming: {len(run.state['done'])} of {len(run.dataset.items)} recording(s) already done.")
    else:
        if run.o.resume:
            run.progress.log(f"--resume: nothing to resume in {run.out}; starting a new run.")
        clear_earlier_run(run.out)  # checked to hold only ttt's own files (--overwrite)
        run.state = resume.new_state(config)
    try:
        sdir.mkdir(parents=True, exist_ok=True)
        resume.write_state(sdir, run.state)
        resume.remove_ranks(run.out)  # their recordings are in the state file now (checked to be ours)
    except OSError as e:
        stop(run, e)


def changed(run: AsrRun, entry: dict, item: AsrItem) -> str | None:
    """Why a finished recording must be transcribed again (its audio or a hypothesis file changed), or None.

    Args:
        run: the run.
        entry: the recording's resume entry.
        item: the recording as discovered now.
    """
    want = (entry.get("inputs") or {}).get("sha256")
    if digest_or_none(item.audio) != want:
        return "its audio changed"
    for p in (entry.get("policies") or {}).values():
        for name, digest in (p.get("sha256") or {}).items():
            if digest_or_none(run.out / name) != digest:
                return f"its hypothesis file {name} is missing or changed"
    return None
