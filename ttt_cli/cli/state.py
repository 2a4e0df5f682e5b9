"""`ttt export-state`, `ttt inspect-state`, `ttt diff-state`: fast-weight snapshots (SPEC §5.3)."""

from __future__ import annotations

import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import (AudioStream, BaseOpt, check_memory, DebugOpt, Device, DeviceOpt, DistTimeoutOpt, DType, DTypeOpt, err, fail,
                     ForceOpt, ForceStateOpt, handle_errors, inputs_error, JsonOpt, ModelOpt, OverwriteOpt, print_json,
                     print_table, say_model_notes, SeedOpt, set_seed, TelemetryOpt, TextStream, ttt_overrides, TTTChunkOpt,
                     TTTClipOpt, TTTLayersOpt, TTTLrOpt, TTTOpt, warn)


# One piece: a Typer command's signature is its option list; the body checks --out, loads the model, calls the
# library (`ttt_cli.snapshot.export`) and hands the result to `_report_export`.
def export_state_cmd(
    audio: Annotated[list[Path], typer.Argument(readable=False, help="Audio files (wav, flac, mp3, ogg, ...).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Snapshot file (one snapshot) or directory (several).")],
    model: ModelOpt = None,
    base: BaseOpt = None,
    at: Annotated[tp.Optional[list[str]], typer.Option("--at", help="Also snapshot at this time (1.5, 30s, 2m); repeatable.")] = None,
    flush_partial: Annotated[bool, typer.Option("--flush-partial", help="Apply the pending partial chunk's update in the written snapshots.")] = False,
    audio_stream: Annotated[AudioStream, typer.Option("--audio-stream", help="Stream the audio codes go on.")] = AudioStream.moshi,
    text_stream: Annotated[TextStream, typer.Option("--text-stream", help="Text tokens: zero (-1) or pad.")] = TextStream.zero,
    channel: Annotated[tp.Optional[int], typer.Option("--channel", help="Take this channel instead of mixing down.")] = None,
    block_steps: Annotated[int, typer.Option("--block-steps", help="LM steps per streaming call.")] = 250,
    init_state: Annotated[tp.Optional[Path], typer.Option("--init-state", readable=False, help="Start every stream from this snapshot.")] = None,
    telemetry: TelemetryOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    ttt: TTTOpt = True,
    ttt_lr: TTTLrOpt = None,
    ttt_chunk_size: TTTChunkOpt = None,
    ttt_layers: TTTLayersOpt = None,
    ttt_clip: TTTClipOpt = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    force: ForceOpt = False,
    force_state: ForceStateOpt = False,
    dist_timeout: DistTimeoutOpt = 600.0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stream audio through the model (teacher forcing) and write fast-weight snapshots.

    One input and no --at: OUT is the snapshot file. Otherwise OUT is a directory holding
    <stem>.at-<seconds>s.safetensors per --at time and <stem>.end.safetensors. Every file is
    loaded back and checked before success is reported. Unreadable inputs are skipped (exit 1).

    Examples:

      ttt export-state examples/hello.wav --model tiny --out hello.safetensors

      ttt export-state talk.wav --model tiny --at 1.5 --at 3s --out states/ --flush-partial

      ttt export-state talk.wav --model tiny --out talk.safetensors --telemetry series/

      torchrun --nproc-per-node 4 -m ttt_cli export-state talks/*.wav --model tiny --out states/
    """
    from .. import distributed
    from ..errors import ConfigError
    from ..models.loader import load_model
    from ..outputs import InputLedger
    from ..snapshot.export import export_states, output_plan, telemetry_paths
    from ..units import parse_seconds

    at_sec = sorted(set(parse_seconds(t) for t in at or []))
    if any(t < 0 for t in at_sec):
        raise ConfigError(f"--at times must be >= 0, got {[t for t in at_sec if t < 0]}.")
    session = distributed.start(dist_timeout, device.value, "finished snapshots are kept; run again on the inputs "
                                "not done")
    layout, plans, oplan = output_plan(list(audio), out, at_sec, overwrite, init_state, model,
                                       telemetry)  # before any work
    session.sync("export-checked")  # under torchrun: no rank writes before every rank checked --out
    ledger = InputLedger(audio)
    mine = distributed.share_files(audio)
    series = telemetry_paths(list(audio), telemetry)  # named over all inputs, like the snapshots
    res = None
    try:
        set_seed(seed)
        m = load_model(model, device=session.device(device.value), dtype=dtype.value, base=base,
                       ttt=ttt_overrides(ttt, ttt_lr, ttt_chunk_size, ttt_layers, ttt_clip))
        say_model_notes(m)
        err(check_memory(m, 1, force))
        with distributed.progress() as progress:
            res = export_states(m, [audio[i] for i in mine], out, at=at_sec, flush_partial=flush_partial, overwrite=overwrite,
                                audio_stream=audio_stream.value, text_stream=text_stream.value, channel=channel,
                                block_steps=block_steps, init_state=init_state, force=force_state, progress=progress,
                                guard=(layout, [plans[i] for i in mine], oplan), ledger=ledger, keys=mine,
                                telemetry=telemetry, series=[series[i] for i in mine]) if mine else None
    finally:
        oplan.cleanup()
    res = _merge_shares(res, ledger, mine)
    if res is None:  # a rank other than 0: rank 0 reports for the job
        raise typer.Exit(1 if any(ledger.records[i].failed for i in mine) else 0)
    _report_export(res, json_out)


def _report_export(res, json_out: bool) -> None:
    """Prints an `ExportResult` (table or --json) and exits per SPEC §5: 130 interrupted, 1 stopped by a write
    failure or some inputs failed, else returns (0)."""
    for it in res.items:
        for w in (it.audio or {}).get("warnings", []):
            warn(w)
    code = 1 if res.failed else 0
    if res.interrupted:
        done = [it.input for it in res.items if it.ok]
        rest = [it.input for it in res.items if not it.ok]
        fail(130, f"interrupted: {len(done)} input(s) finished, their snapshots are kept; run again on the others "
                  f"({' '.join(rest[:5])}{' ...' if len(rest) > 5 else ''}).",
             "run the command again on the inputs not run", json_out, {**res.to_dict(), "exit_code": 130})
    if res.stopped:
        n = sum(1 for it in res.items if it.error and "not run" in it.error)
        fail(1, f"{res.stopped}. Snapshots already written stay; {n} input(s) not run.",
             "free some space or write elsewhere, then run again on the inputs not run", json_out,
             {**res.to_dict(), "exit_code": 1})
    if json_out:
        print_json({**res.to_dict(), "exit_code": code, **inputs_error(code, "; ".join(
            str(it.error) for it in res.failed))})
    else:
        _print_export_table(res)
    if res.failed:
        err(f"{len(res.failed)} of {len(res.items)} input(s) failed:")
        for it in res.failed:
            err(f"  {it.error}")
        raise typer.Exit(code)


def _print_export_table(res) -> None:
    """The snapshots written, one row each, with the notes of their inputs (stderr)."""
    rows = []
    for it in res.items:
        for n in it.notes:
            err(f"note: {n}")
        for s in it.snapshots:
            rows.append([Path(it.input).name, s.label, s.steps, s.seconds,
                         " ".join(f"{k}:{v}" for k, v in s.pending_tokens.items()),
                         " ".join(f"{k}:{v:.3f}" for k, v in s.relative_drift.items()), Path(s.path).name])
    print_table(f"fast-weight snapshots ({res.model}, fingerprint {res.model_fingerprint[:12]}, "
                f"{'flushed' if res.flush_partial else 'pending kept'})",
                ["input", "snapshot", "steps", "seconds", "pending", "drift", "file"], rows)
    err("pending = tokens of the unfinished chunk per layer; drift = ‖W − W0‖/‖W0‖ per layer.")
    ok = sum(len(it.snapshots) for it in res.items)
    err(f"wrote and verified {ok} snapshot(s) in {res.elapsed_seconds:.1f} s.")


def inspect_state_cmd(
    state: Annotated[Path, typer.Argument(readable=False, help="Snapshot file (.safetensors).", show_default=False)],
    model: Annotated[tp.Optional[str], typer.Option("--model", "-m", help="Check fit and measure drift against this model.")] = None,
    base: BaseOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    ttt: TTTOpt = True,
    ttt_lr: TTTLrOpt = None,
    ttt_chunk_size: TTTChunkOpt = None,
    ttt_layers: TTTLayersOpt = None,
    ttt_clip: TTTClipOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per TTT layer: ‖W‖, ‖W0‖, ‖W − W0‖, relative drift, pending tokens; with --model, whether it fits.

    Without --model the drift is the one recorded when the snapshot was taken (against the W0 of
    the model it came from); with --model it is measured against that model's W0.

    Examples:

      ttt inspect-state hello.safetensors

      ttt inspect-state hello.safetensors --model tiny --json
    """
    from ..fastweights.config import config_class
    from ..models.loader import load_model
    from ..state import inspect_state, load_state

    s = load_state(state)
    m = None
    if model is not None:
        m = load_model(model, device=device.value, dtype=dtype.value, base=base,
                       ttt=ttt_overrides(ttt, ttt_lr, ttt_chunk_size, ttt_layers, ttt_clip))
    res = inspect_state(s, m)
    if json_out:
        print_json({"path": str(state), "checked_model": model, **res.to_dict(), **_fit_error(res, model)})
        _exit_unless_fits(res, model)
        return
    meta = s.meta
    rate_key = config_class(s.variant).rate_key
    err(f"{state}: {s.variant} fast weights of {meta.get('model') or 'unknown model'}, layers {s.layers}, "
        f"chunk {meta['chunk_size']}, {rate_key} {meta[rate_key]}, {meta.get('steps')} steps "
        f"({float(meta.get('seconds') or 0):.2f} s) of {', '.join(meta.get('source_files') or []) or 'unknown input'}"
        f"{', flushed' if meta.get('flushed') else ''}{', with attention state' if s.has_attention else ''}; "
        f"fingerprint {s.fingerprint[:12]}, created {meta.get('created')}.")
    against = "this model's W0" if any(r.drift_against == "model" for r in res.layers) else "recorded W0"
    print_table(f"per layer (drift against {against})", ["layer", "‖W‖", "‖W0‖", "‖W − W0‖", "drift", "pending"],
                [[r.layer, r.w_norm, r.w0_norm, r.delta_norm, r.relative_drift, r.pending_tokens] for r in res.layers])
    if res.fit is None:
        err("fit: not checked (pass --model M to check that the snapshot fits a model).")
    elif res.fit.fits:
        err(f"fit: fits {model} (same fingerprint {res.fit.model_fingerprint[:12]}).")
    _exit_unless_fits(res, model)


def _fit_error(res, model: str | None) -> dict:
    """The `error` entry when the snapshot does not fit the --model it was checked against, else {}."""
    if res.fit is None or res.fit.fits:
        return {}
    how = "restorable with --force-state" if res.fit.forceable else "cannot be forced"
    return {"error": {"code": 2, "message": f"the snapshot does not fit {model} ({how}): {res.fit.reason()}.",
                      "hint": "use a snapshot taken with this model" + (", or pass --force-state to use it anyway"
                                                                       if res.fit.forceable else "")}}


def _exit_unless_fits(res, model: str | None) -> None:
    """inspect-state --model doubles as a fit check: exit 2 (after the report) when the snapshot does not fit."""
    e = _fit_error(res, model)
    if e:
        err(f"error: {e['error']['message']}")
        raise typer.Exit(2)


def diff_state_cmd(
    a: Annotated[Path, typer.Argument(readable=False, help="First snapshot.", show_default=False)],
    b: Annotated[Path, typer.Argument(readable=False, help="Second snapshot.", show_default=False)],
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare two snapshots: per layer ‖W_A‖, ‖W_B‖, ‖W_A − W_B‖, relative difference, pending tokens.

    Examples:

      ttt diff-state states/talk.at-1.5s.safetensors states/talk.end.safetensors
    """
    from ..state import diff_states, load_state

    sa, sb = load_state(a), load_state(b)
    res = diff_states(sa, sb)
    if json_out:
        print_json({"a": str(a), "b": str(b), **res.to_dict()})
        return
    na = "n/a"
    print_table(f"{a.name} vs {b.name}", ["layer", "‖W_A‖", "‖W_B‖", "‖W_A − W_B‖", "rel. diff", "max |Δ|",
                                          "pending A", "pending B"],
                [[r.layer, r.w_norm_a, r.w_norm_b, na if r.diff_norm is None else r.diff_norm,
                  na if r.relative_diff is None else r.relative_diff, na if r.max_abs_diff is None else r.max_abs_diff,
                  r.pending_a, r.pending_b] for r in res.layers])
    if res.only_in_a or res.only_in_b:
        err(f"TTT layers only in A: {res.only_in_a}; only in B: {res.only_in_b}.")
    for k, (va, vb) in res.meta_differs.items():
        if k not in ("model_fingerprint", "w0_fingerprint"):
            err(f"{k}: A {va} | B {vb}")
    err(f"{'identical snapshots' if res.identical else 'snapshots differ'}; "
        f"{'same' if res.same_fingerprint else 'different'} model fingerprint.")


def _merge_shares(res, ledger, mine: list[int]):
    """Under torchrun: rank 0's result with every rank's items (input order) and accounts; None elsewhere.
    Without torchrun: `res` as it is. Either way it records the `distributed` provenance (SPEC §5.6)."""
    from .. import distributed
    from ..snapshot.export import ExportItem, SnapshotInfo
    session = distributed.current()
    if session.active:
        mine_items = {str(i): d for i, d in zip(mine, res.to_dict()["items"])} if res is not None else {}
        parts = distributed.gather_accounts(ledger, mine, mine_items)
        if parts is None:
            return None
        merged = {int(k): d for p in parts for k, d in p.items()}
        res.items = [ExportItem(**{**d, "snapshots": [SnapshotInfo(**sn) for sn in d["snapshots"]]})
                     for _, d in sorted(merged.items())]
        res.inputs = ledger.to_dict()
    res.distributed = session.record()
    return res


def register(app: typer.Typer) -> None:
    app.command("export-state")(handle_errors(export_state_cmd))
    app.command("inspect-state")(handle_errors(inspect_state_cmd))
    app.command("diff-state")(handle_errors(diff_state_cmd))
