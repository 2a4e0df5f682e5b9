"""A whole `ttt infer` run into an output directory: outputs planned before the model loads, every input accounted for."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import WavStream
from ..errors import ConfigError, WriteError
from ..io import describe_os_error
from ..outputs import InputLedger, InputRecord, OutputPlan
from ..progress import NullProgress, Progress
from .files import output_paths, plan_jobs, plan_outputs, state_paths, write_result
from .options import InferOptions, preflight
from .results import FileResult, InferRun, Job
from .runner import infer


@dataclass
class DirectoryPlan:
    """Where a run writes, checked before the model loads, so that outputs never touch an input.

    Args:
        out: --out.
        opts: the options.
        jobs: the planned inputs.
        states: --save-state paths by job index.
        plan: the checked and prepared OutputPlan (`cleanup()` when the run is over).
    """

    out: Path
    opts: InferOptions
    jobs: list[Job]
    states: dict[int, Path]
    plan: OutputPlan

    def for_model(self, model) -> str:
        """Resolves the mode for the loaded model; when it turns out dialog, its .wav outputs are checked too.

        Args:
            model: a TTTModel.
        Returns:
            the resolved mode.
        """
        mode, _ = preflight(model, self.opts, len(self.jobs))
        if mode == "dialog" and self.opts.mode != "dialog":  # known now: the .wav outputs
            plan_outputs(self.plan, self.out, self.jobs, mode, {}, kinds=("wav",))
            self.plan.check()
        return mode


def plan_directory(paths: tp.Sequence[str | Path], out: Path, opts: InferOptions, model_ref: str | None,
                   overwrite: bool = False) -> DirectoryPlan:
    """Names the inputs' outputs and checks every read and write of the run before any work (SPEC §7).

    Args:
        paths: the input audio files, in command-line order.
        out: --out (created if needed).
        opts: the options (`save_state`, `init_state`, `telemetry`, `mode`).
        model_ref: --model, read by the run (never written).
        overwrite: earlier outputs of ttt may be replaced.
    Raises:
        ConfigError, OutputError: a usage error or an output that cannot or must not be written (exit 2).
    """
    jobs = plan_jobs(paths)
    states = state_paths(opts.save_state, jobs, opts.reset_policy)
    save_state = opts.save_state
    several = len(set(states.values())) > 1
    if save_state is not None and several and save_state.exists() and not save_state.is_dir():
        raise ConfigError(f"--save-state {save_state}: several streams write one snapshot each into a directory, "
                          f"but {save_state} is a file.")
    plan = OutputPlan(overwrite)
    for j in jobs:
        plan.read(j.path, "an input audio file")
    plan.read(opts.init_state, "the --init-state snapshot")
    plan.read_model(model_ref)
    plan.write_into(out)
    if save_state is not None and (several or save_state.is_dir()):
        plan.write_into(save_state, "--save-state")
    plan_outputs(plan, out, jobs, opts.mode if opts.mode != "auto" else None, states, telemetry=opts.telemetry,
                 formats=opts.formats)
    plan.check().prepare()
    return DirectoryPlan(out, opts, jobs, states, plan)


@dataclass
class DirectoryRun:
    """What `run_to_directory` did: the run, or what stopped it (the inputs it left are in the ledger)."""

    ledger: InputLedger
    run: InferRun | None = None
    write_error: WriteError | None = None  # a write failure stopped the run
    interrupted: bool = False              # Ctrl-C stopped the run
    not_run: list[InputRecord] = field(default_factory=list)  # the inputs the stop left not run


def run_to_directory(model, jobs: list[Job], opts: InferOptions, out: Path, states: dict[int, Path] | None = None,
                     ledger: InputLedger | None = None, progress: Progress | None = None,
                     on_warning: tp.Callable[[str], None] | None = None,
                     provenance: tp.Callable[[], dict] | None = None) -> DirectoryRun:
    """Streams the jobs, writing each result (`write_result`) as it completes; accounts for every input.

    A write failure (disk full, read-only, permission) or Ctrl-C stops the run and is returned, not
    raised: finished outputs stay, the input being written is skipped with the reason, the others are
    marked not run. In dialog mode Moshi's voice goes to `<stem>.wav` (a temporary name) as it is produced.

    Args:
        model: a TTTModel.
        jobs: the planned inputs this process runs (`plan_jobs`; under torchrun its share).
        opts: the options.
        out: --out.
        states: --save-state paths by job index (`state_paths`).
        ledger: the run's InputLedger, keyed by job index (None: one for `jobs`).
        progress: progress hook.
        on_warning: called with each input's warnings (e.g. a truncated file).
        provenance: gives the `distributed` object of each `<stem>.json` (SPEC §5.6), or None.
    """
    states = states or {}
    ledger = ledger if ledger is not None else InputLedger([j.path for j in jobs], [j.index for j in jobs])
    progress = progress or NullProgress()

    def failed(res: FileResult, default: str) -> None:
        ledger.skip(res.job.index, res.error.removeprefix(f"{res.job.path}: ") if res.error else default)

    def on_result(res: FileResult, run: InferRun) -> None:
        if provenance is not None:
            run.distributed = provenance()
        try:
            write_result(res, run, out, states.get(res.job.index))
        except KeyboardInterrupt:
            failed(res, "interrupted (Ctrl-C) while its outputs were written; none of them is left")
            raise
        except BaseException:
            failed(res, "its outputs could not be written")
            raise
        if res.ok:
            ledger.done(res.job.index, res.info.warnings if res.info else ())
        else:
            failed(res, "failed")
        if res.info is not None and on_warning is not None:
            for w in res.info.warnings:
                on_warning(w)
        if not res.ok:
            progress.log(f"skipped: {res.error}")

    try:
        return DirectoryRun(ledger, infer(model, jobs, opts, progress, on_result=on_result,
                                          audio_out=lambda job: _voice_file(out, job)))
    except WriteError as e:
        rest = ledger.not_run(f"the run stopped after a write failure ({e.detail})")
        return DirectoryRun(ledger, write_error=e, not_run=rest)
    except KeyboardInterrupt:
        return DirectoryRun(ledger, interrupted=True, not_run=ledger.not_run("interrupted (Ctrl-C)"))


def _voice_file(out: Path, job: Job) -> WavStream:
    """dialog: the `WavStream` Moshi's voice for `job` is written to as it is produced."""
    path = output_paths(out, job, "dialog")["wav"]
    try:
        return WavStream(path)
    except OSError as e:
        detail = describe_os_error(e, path)
        raise WriteError(f"{detail}.", detail=detail) from None
