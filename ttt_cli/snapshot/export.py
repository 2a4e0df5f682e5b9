"""`export-state` as a library: teacher-forced streaming over audio, fast-weight snapshots at chosen times (SPEC §5.3)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..audio import iter_audio
from ..codes import encode_audio, lm_input_codes, transformer_input
from ..errors import ConfigError, InputError, StateMismatchError
from ..infer import plan_jobs
from ..io import as_os_error, describe_os_error
from ..outputs import InputLedger, OutputPlan, safetensors_with_metadata
from ..progress import NullProgress
from ..streaming import block_streaming
from ..telemetry import FLAG, paused, plan_series, recording, series_paths, take_rows, write_series
from ..units import FRAME_RATE, seconds_to_steps
from .capture import capture, restore, restore_layers
from .files import load_state, save_state
from .fit import check_fits, fast_layers, fingerprint, model_config
from .format import FastWeightState

DEFAULT_BLOCK_STEPS = 250  # LM steps per forward_text call (the attention cache is enlarged to match)
SUFFIX = ".safetensors"
RESET_POLICY = "file"  # every input is its own stream, starting from the model's initial fast weights


@dataclass
class SnapshotInfo:
    """One written snapshot."""

    path: str
    label: str                 # "at-1.5s" or "end"
    steps: int                 # transformer input positions consumed
    seconds: float             # steps / 12.5
    requested_seconds: float | None
    pending_tokens: dict[str, int]
    relative_drift: dict[str, float]
    flushed: bool
    verified: bool


@dataclass
class ExportItem:
    """The outcome for one input file."""

    input: str
    ok: bool
    error: str | None = None
    audio: dict | None = None
    steps: int = 0
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    telemetry: dict | None = None  # {"csv", "png"}: the update series (`--telemetry`)


@dataclass
class ExportResult:
    """Everything `export_states` did."""

    model: str
    model_fingerprint: str
    ttt: dict
    out: str
    layout: str                # "file" (one snapshot) or "directory"
    flush_partial: bool
    init_state: str | None
    items: list[ExportItem]
    elapsed_seconds: float
    provenance: dict | None = None  # files the model was loaded from and the mapping applied
    inputs: dict = field(default_factory=dict)   # the accounting of inputs (`InputLedger.to_dict()`)
    stopped: str | None = None                   # why the run stopped early (a write failure), if it did
    interrupted: bool = False                    # Ctrl-C stopped it (finished snapshots are kept)
    distributed: dict | None = None              # world size, backend, shares (SPEC §5.6), set by the command

    @property
    def failed(self) -> list[ExportItem]:
        return [it for it in self.items if not it.ok]

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt_seconds(sec: float) -> str:
    return f"{sec:g}"


def unique_stems(paths: list[Path]) -> list[str]:
    """File stems, `<parent>_<stem>` where inputs share a stem (the naming of `ttt infer`).

    Args:
        paths: the input files.
    """
    return [j.stem for j in plan_jobs(paths)]


def plan_outputs(inputs: list[Path], out: Path, at_seconds: list[float]) -> tuple[str, list[dict[str, Path]]]:
    """Where each snapshot goes: one snapshot -> `out` is that file; otherwise `out` is a directory.

    Args:
        inputs: the input files.
        out: `--out`.
        at_seconds: the `--at` times.
    Returns:
        (layout, per input {label: path}) with labels `at-<seconds>s` and `end`.
    """
    labels = [f"at-{_fmt_seconds(t)}s" for t in at_seconds] + ["end"]
    single = len(inputs) == 1 and not at_seconds and not (out.exists() and out.is_dir())
    if single:
        return "file", [{"end": out}]
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: several snapshots result ({len(inputs)} input(s), {len(at_seconds)} --at "
                          f"time(s) + the end), so --out must be a directory, but it is a file.",
                          hint="give --out a directory")
    return "directory", [{lab: out / f"{stem}.{lab}{SUFFIX}" for lab in labels} for stem in unique_stems(inputs)]


def telemetry_paths(inputs: list[Path], telemetry: Path | None) -> list[dict[str, Path] | None]:
    """Per input, the update series' CSV and PNG in `telemetry` (named like the snapshots), or None.

    Args:
        inputs: the input files.
        telemetry: the `--telemetry` directory, or None.
    """
    return [None if telemetry is None else series_paths(telemetry, stem) for stem in unique_stems(inputs)]


def output_plan(inputs: list[Path], out: Path, at_seconds: list[float], overwrite: bool = False,
                init_state: Path | None = None, model: str | None = None, telemetry: Path | None = None):
    """The checked `OutputPlan` of an export (SPEC §7.1): refuses outputs that are inputs or foreign files.

    Args:
        inputs: the input audio files.
        out: `--out`.
        at_seconds: the `--at` times.
        overwrite: replace snapshots (and series) a previous export wrote.
        init_state: the `--init-state` snapshot (read, never written).
        model: the `--model` source (read, never written).
        telemetry: the `--telemetry` directory, or None.
    Returns:
        (layout, per input {label: path}, the prepared OutputPlan).
    """
    layout, plans = plan_outputs(inputs, out, at_seconds)
    plan = OutputPlan(overwrite)
    for p in inputs:
        plan.read(p, "an input audio file")
    plan.read(init_state, "the --init-state snapshot")
    plan.read_model(model)
    if layout == "directory":
        plan.write_into(out)
    ours = safetensors_with_metadata("ttt_state")
    for src, per in zip(inputs, plans):
        for label, dest in per.items():
            plan.write(dest, "--out", f"the {label} snapshot of {src.name}", ours)
    if telemetry is not None:
        plan.write_into(telemetry, FLAG)
        for src, paths in zip(inputs, telemetry_paths(inputs, telemetry)):
            plan_series(plan, paths, src.name)
    return layout, plans, plan.check().prepare()


@dataclass
class _Run:
    """The settings every input of one `export_states` call shares."""

    model: object                   # the TTTModel
    at_sec: list[float]
    flush_partial: bool
    audio_stream: str
    text_stream: str
    channel: int | None
    block_steps: int
    init: FastWeightState | None    # the --init-state snapshot, checked against the model
    init_state: str | Path | None   # its path, as given
    force: bool
    fingerprint: str                # the model's
    progress: object


# One piece: its length is the documented argument list (the public API of `ttt export-state`); the body is short,
# its steps are `_checked_inputs`, `_export_all` and, per input, `_export_one`.
def export_states(model, inputs: list[str | Path], out: str | Path, at: list[float] | None = None,
                  flush_partial: bool = False, overwrite: bool = False, audio_stream: str = "moshi",
                  text_stream: str = "zero", channel: int | None = None, block_steps: int = DEFAULT_BLOCK_STEPS,
                  init_state: str | Path | None = None, force: bool = False, progress=None,
                  guard=None, ledger=None, keys: list[int] | None = None,
                  telemetry: str | Path | None = None, series: list | None = None) -> ExportResult:
    """Streams each input through the model (teacher forcing, SPEC §6 layout) and writes snapshots.

    Each input is its own stream (batch 1) starting from the model's initial fast weights. A snapshot
    at time t holds the state after `round(t x 12.5)` transformer input positions (the initial token
    and the delayed codes before step t); resuming feeds the sequence from that position on.

    Args:
        model: a TTTModel (`load_model`).
        inputs: audio files.
        out: a file (exactly one snapshot) or a directory (several).
        at: snapshot times in seconds (an `end` snapshot is always written).
        flush_partial: apply the pending partial chunk in the written snapshots (the stream itself
            goes on unflushed, so later snapshots do not depend on earlier ones).
        overwrite: replace existing snapshot files.
        audio_stream: `moshi` or `user` (where the audio codes go).
        text_stream: `zero` or `pad`.
        channel: audio channel to take instead of mixing down.
        block_steps: LM steps per streaming call.
        init_state: a snapshot every stream starts from (restored as by `ttt_cli.state.restore`).
        force: restore `init_state` despite forceable differences (another lr or clip).
        progress: a progress hook (see `ttt_cli.progress`).
        guard: the `(layout, plans, OutputPlan)` of `output_plan`, when the caller checked it before
            loading the model (None: checked here).
        telemetry: a directory for each input's update series (`<stem>.updates.csv` and `.png`, SPEC §3.7).
        series: per input, its series paths (a share of a larger run, named over all its inputs; default:
            named over `inputs`).
        ledger: the `InputLedger` to account the inputs in (None: a new one over `inputs`); with
            `keys`, the key of each input in it (a share of a larger run under torchrun).
        keys: see `ledger`.
    Returns:
        ExportResult; inputs that could not be read are reported in it, not raised. A write failure
        (disk full, read-only) stops the run: snapshots already written stay, the input being
        written and the ones after it are reported (`stopped` says why).
    """
    progress = progress or NullProgress()
    t0 = time.monotonic()
    paths, at_sec = _checked_inputs(inputs, at, block_steps)
    fast_layers(model.lm)  # refuses a model without TTT layers before anything is written
    out = Path(out)
    telemetry = None if telemetry is None else Path(telemetry)
    layout, plans, oplan = guard if guard is not None else output_plan(
        paths, out, at_sec, overwrite, None if init_state is None else Path(init_state), None, telemetry)
    series = telemetry_paths(paths, telemetry) if series is None else series
    cfg, fp = model_config(model.lm), fingerprint(model.lm)
    init = None
    if init_state is not None:
        init = load_state(init_state)
        check_fits(model, init).raise_unless_fits(force, flag="--force-state")  # refuse before anything is written
    run = _Run(model, at_sec, flush_partial, audio_stream, text_stream, channel, block_steps, init, init_state,
               force, fp, progress)
    keys = list(range(len(paths))) if keys is None else list(keys)
    ledger = InputLedger(paths, keys) if ledger is None else ledger
    try:
        items, stopped, interrupted = _export_all(run, paths, plans, series, ledger, keys)
    finally:
        oplan.cleanup()
    return ExportResult(model.model_id, fp, {k: v for k, v in cfg.to_dict().items() if k != "ttt_name"},
                        str(out), layout, flush_partial, None if init_state is None else str(init_state), items,
                        time.monotonic() - t0, model.config.get("provenance"), ledger.to_dict(), stopped,
                        interrupted)


def _checked_inputs(inputs: list[str | Path], at: list[float] | None, block_steps: int
                    ) -> tuple[list[Path], list[float]]:
    """The input paths and the sorted distinct `--at` times; ConfigError for arguments no export can take."""
    if block_steps < 1:
        raise ConfigError(f"--block-steps must be >= 1, got {block_steps}.")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("no input audio files given.")
    at_sec = sorted(set(float(t) for t in at or []))
    if any(t < 0 for t in at_sec):
        raise ConfigError(f"--at times must be >= 0, got {[t for t in at_sec if t < 0]}.")
    return paths, at_sec


def _export_all(run: _Run, paths: list[Path], plans: list[dict[str, Path]], series: list, ledger,
                keys: list[int]) -> tuple[list[ExportItem], str | None, bool]:
    """Exports the inputs in order, accounting each in `ledger`: an unreadable input is skipped, Ctrl-C or a
    write failure stops the run (the inputs after it are reported not run). Returns (items, stopped, interrupted)."""
    items: list[ExportItem] = []
    for n, (path, plan, tpaths) in enumerate(zip(paths, plans, series)):
        item = ExportItem(str(path), ok=False)
        items.append(item)
        try:
            _export_one(run, item, path, plan, tpaths)
        except InputError as e:
            item.error = str(e)
            ledger.skip(keys[n], str(e).removeprefix(f"{path}: "))
            run.progress.log(f"skipped {path}: {e}")
            continue
        except KeyboardInterrupt:
            item.error = f"{path}: interrupted (Ctrl-C)"
            ledger.skip(keys[n], "interrupted (Ctrl-C)")
            ledger.not_run("interrupted (Ctrl-C)")
            items += [ExportItem(str(p), ok=False, error=f"{p}: not run (interrupted)") for p in paths[n + 1:]]
            return items, None, True
        except Exception as e:
            ose = as_os_error(e)
            if ose is None:
                raise
            stopped = describe_os_error(ose, ose.filename)
            item.error = f"{path}: {stopped}"
            ledger.skip(keys[n], stopped)
            ledger.not_run(f"the run stopped after a write failure ({stopped})")
            items += [ExportItem(str(p), ok=False, error=f"{p}: not run (the run stopped after a write failure)")
                      for p in paths[n + 1:]]
            return items, stopped, False
        ledger.done(keys[n], (item.audio or {}).get("warnings", []))
    return items, None, False


def _export_one(run: _Run, item: ExportItem, path: Path, plan: dict[str, Path],
                telemetry: dict[str, Path] | None = None) -> None:
    """Streams one input and writes its snapshots (see `export_states`); raises InputError or OSError."""
    model, lm = run.model, run.model.lm
    seq = _input_sequence(run, item, path)  # [1, K, T]
    T = seq.shape[-1]
    cuts = _cuts(run.at_sec, T, path, item)
    key = f"export:{path}"
    run.progress.start(key, f"export-state {path.name}", T / FRAME_RATE)
    pos = 0
    with torch.no_grad(), recording(lm, telemetry is not None), block_streaming(lm, 1, run.block_steps):
        if run.init is not None:
            restore(lm, run.init, 0, force=run.force)
        for stop in sorted(cuts):
            while pos < stop:
                n = min(run.block_steps, stop - pos)
                lm.forward_text(seq[:, :, pos:pos + n])
                pos += n
                run.progress.update(key, pos / FRAME_RATE)
            for label, req in cuts[stop]:
                item.snapshots.append(_write_snapshot(run, path, plan[label], label, stop, req))
        if telemetry is not None:
            item.telemetry = write_series(telemetry, take_rows(lm, 0), 0, f"{model.model_id}: {path.name}")
    run.progress.finish(key, steps=T, snapshots=len(item.snapshots))
    item.ok = True


def _input_sequence(run: _Run, item: ExportItem, path: Path) -> torch.Tensor:
    """The transformer input [1, K, T] of one audio file (SPEC §6 layout); records its audio facts and steps."""
    model, lm = run.model, run.model.lm
    # decoded and encoded piece by piece: memory does not grow with the file
    info, pieces = iter_audio(path, run.channel)
    audio = encode_audio(model.mimi, pieces, device=model.device)  # [n_q, T]
    item.audio = info.to_dict()
    codes = lm_input_codes(lm, audio, run.audio_stream, run.text_stream)  # [K, T]
    seq = transformer_input(lm, codes[None].to(model.device))  # [1, K, T]
    item.steps = seq.shape[-1]
    return seq


def _cuts(at_sec: list[float], T: int, path: Path, item: ExportItem) -> dict[int, list[tuple[str, float | None]]]:
    """{step: [(label, requested seconds)]} of the snapshots of one input; `--at` times past its end are noted."""
    cuts: dict[int, list[tuple[str, float | None]]] = {}
    for sec in at_sec:
        s = seconds_to_steps(sec)
        if s > T:
            item.notes.append(f"--at {_fmt_seconds(sec)}s (step {s}) is past the end of {path.name} "
                              f"({T} steps = {T / FRAME_RATE:.2f} s): no snapshot for it.")
            continue
        cuts.setdefault(s, []).append((f"at-{_fmt_seconds(sec)}s", sec))
    cuts.setdefault(T, []).append(("end", None))
    return cuts


def _write_snapshot(run: _Run, path: Path, dest: Path, label: str, stop: int, req: float | None) -> SnapshotInfo:
    """Captures the stream now (flushed if asked, the stream itself going on as it was), writes it to `dest` and
    checks what is on disk against the model before reporting it."""
    model, lm = run.model, run.model.lm
    if run.flush_partial:
        layers = fast_layers(lm)
        before = {i: layer.capture(0) for i, layer in layers.items()}
        with paused(lm):  # the written copy is flushed, the stream (and its series) goes on as it was
            for layer in layers.values():
                layer.flush_partial(0)
        snap = capture(model, 0)
        restore_layers(lm, before, 0)  # the stream goes on as it was
    else:
        snap = capture(model, 0)
    meta = {"steps": stop, "seconds": stop / FRAME_RATE, "source_files": [str(path)],
            "reset_policy": RESET_POLICY, "flushed": run.flush_partial, "label": label,
            "at_seconds": req, "audio_stream": run.audio_stream, "text_stream": run.text_stream,
            "model": model.model_id, "init_state": None if run.init_state is None else str(run.init_state)}
    save_state(snap, dest, metadata=meta, overwrite=True, verify=True)  # the plan checked it
    back = load_state(dest)  # check what is on disk before reporting success
    report = check_fits(model, back)
    if not report.fits or back.fingerprint != run.fingerprint:
        raise StateMismatchError(f"{dest} was written but does not fit the model it came from: "
                                 f"{report.reason() or 'fingerprint differs'}.")
    tel = back.meta["telemetry"]
    return SnapshotInfo(str(dest), label, stop, stop / FRAME_RATE, req,
                        {k: int(v) for k, v in back.meta["pending_tokens"].items()},
                        {k: float(v.get("relative_drift", float("nan"))) for k, v in tel.items()},
                        run.flush_partial, True)
