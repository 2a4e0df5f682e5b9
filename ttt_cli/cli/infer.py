"""`ttt infer`: streaming transcription and generation over audio files (SPEC §5.1)."""

from __future__ import annotations

import enum
import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import (SEED_MAX, BaseOpt, DebugOpt, Device, DeviceOpt, DistTimeoutOpt, DType, DTypeOpt, ForceOpt,
                     ForceStateOpt, JsonOpt, ModelOpt, OverwriteOpt, TelemetryOpt, TTTChunkOpt, TTTClipOpt, TTTLayersOpt,
                     TTTLrOpt, TTTOpt,
                     check_memory, err, fail, handle_errors, inputs_error, print_json, print_table, say_model_notes,
                     ttt_overrides, warn)

DEFAULT_SEED = 4242  # = ttt_cli.infer.DEFAULT_SEED (moshi.run_inference's); kept here so --help stays light
TEXT_PREVIEW = 48


class Mode(str, enum.Enum):
    auto = "auto"
    dialog = "dialog"
    transcribe = "transcribe"
    stt = "stt"


class ResetPolicy(str, enum.Enum):
    file = "file"
    carry = "carry"


# One piece over 60 lines: a Typer command whose signature is its option list; the body only parses, calls
# `ttt_cli.infer` (plan_directory, run_to_directory) and reports.
def infer_cmd(
    audio: Annotated[tp.List[Path], typer.Argument(readable=False, help="Audio files: wav, flac, mp3, ogg; any sample rate and "
                                                   "channel count.", show_default=False)],
    model: ModelOpt = None,  # type: ignore[assignment]
    base: BaseOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (created if needed).")] = Path("out"),
    mode: Annotated[Mode, typer.Option("--mode", help="auto: stt for STT checkpoints, else dialog. dialog: input "
                                       "on the user stream, Moshi answers (text + audio). transcribe: input forced "
                                       "on Moshi's own stream, text = what Moshi says for it. stt: STT checkpoints "
                                       "(dep_q = 0).")] = Mode.auto,
    channel: Annotated[tp.Optional[int], typer.Option("--channel", help="Use this channel (0-based) instead of "
                                                      "mixing all channels down.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Files streamed together, each with its own "
                                            "fast weights.")] = 1,
    reset_policy: Annotated[ResetPolicy, typer.Option("--reset-policy", help="file: every file a fresh stream. "
                                                      "carry: the files in order as one continuous stream "
                                                      "(attention and fast weights carried; batch size 1).")]
    = ResetPolicy.file,
    temp: Annotated[tp.Optional[float], typer.Option("--temp", help="Audio sampling temperature "
                                                     "(default: the checkpoint's lm_gen_config, else 0.8).")] = None,
    temp_text: Annotated[tp.Optional[float], typer.Option("--temp-text", help="Text sampling temperature "
                                                          "(default: checkpoint, else 0.7).")] = None,
    top_k: Annotated[tp.Optional[int], typer.Option("--top-k", help="Audio top-k (default: checkpoint, else 250).")]
    = None,
    top_k_text: Annotated[tp.Optional[int], typer.Option("--top-k-text", help="Text top-k (default: checkpoint, "
                                                         "else 25).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Argmax instead of sampling: deterministic output.")]
    = False,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Random seed, 0 .. 2**32 - 1 "
                                      "(moshi.run_inference uses 4242).")] = DEFAULT_SEED,
    ttt: TTTOpt = True,
    ttt_lr: TTTLrOpt = None,
    ttt_chunk_size: TTTChunkOpt = None,
    ttt_layers: TTTLayersOpt = None,
    ttt_clip: TTTClipOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    init_state: Annotated[tp.Optional[Path], typer.Option("--init-state", readable=False, help="Start every stream from this "
                                                          "fast-weight snapshot.")] = None,
    save_state: Annotated[tp.Optional[Path], typer.Option("--save-state", help="Write the fast weights at the end "
                                                          "of the stream: this file for one stream (inside it "
                                                          "if it is a directory), else a directory of "
                                                          "<stem>.end.safetensors.")] = None,
    telemetry: TelemetryOpt = None,
    whole_file_seconds: Annotated[str, typer.Option("--whole-file-seconds", help="Files up to this long are decoded "
                                                    "whole, exactly as moshi.run_inference does; longer ones in "
                                                    "bounded pieces (memory flat in their length): 600, 10m, 1h.")]
    = "600",
    formats: Annotated[str, typer.Option("--format", help="Transcript files per input, a comma list of txt, "
                                         "json, srt, vtt, tsv (openai/whisper's formats), or all. <stem>.json is "
                                         "always written (the record of the input's outputs).")] = "txt,json",
    max_line_width: Annotated[tp.Optional[int], typer.Option("--max-line-width", help="srt/vtt/tsv: characters per "
                                                             "cue line (default 42; a longer word gets its own "
                                                             "line).", show_default=False)] = None,
    max_line_count: Annotated[tp.Optional[int], typer.Option("--max-line-count", help="srt/vtt/tsv: lines per cue "
                                                             "(default 2).", show_default=False)] = None,
    json_out: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    force: ForceOpt = False,
    force_state: ForceStateOpt = False,
    dist_timeout: DistTimeoutOpt = 600.0,
    debug: DebugOpt = False,
) -> None:
    """Stream audio files through Mimi and Moshi (LMGen) with TTT fast weights, frame by frame as live.

    Writes OUT/<stem>.txt, OUT/<stem>.json and, in dialog mode, OUT/<stem>.wav (Moshi's voice); with
    --format also subtitles (.srt, .vtt, .tsv) cut from the word times.
    Bad inputs are reported and skipped (exit 1); usage or checkpoint errors exit 2.

    Examples:

      ttt infer examples/hello.wav --model tiny --out out/

      ttt infer a.wav b.flac --model tiny --batch-size 2 --greedy --json

      ttt infer talk.wav --mode transcribe --no-ttt --out out/baseline

      ttt infer meeting.mp3 --model kyutai/stt-1b-en_fr --mode stt --channel 0

      ttt infer part1.wav part2.wav --reset-policy carry --save-state state.safetensors

      ttt infer talk.wav --model tiny --telemetry series/   (series/talk.updates.csv and .png)

      ttt infer talk.wav --model kyutai/stt-1b-en_fr --format all --max-line-width 32   (+ .srt .vtt .tsv)

      torchrun --nproc-per-node 8 -m ttt_cli infer talks/*.wav --greedy --out out/talks   (one rank per GPU)
    """
    from .. import distributed
    from ..errors import ConfigError
    from ..infer import InferOptions, batch_slots, parse_formats, plan_directory, validate_options
    from ..models.loader import load_model
    from ..outputs import InputLedger
    from ..units import parse_seconds

    opts = InferOptions(mode=mode.value, channel=channel, batch_size=batch_size, reset_policy=reset_policy.value,
                        temp=temp, temp_text=temp_text, top_k=top_k, top_k_text=top_k_text, greedy=greedy,
                        seed=seed, init_state=init_state, save_state=save_state, force=force_state,
                        telemetry=telemetry, whole_file_seconds=parse_seconds(whole_file_seconds),
                        formats=parse_formats(formats), max_line_width=max_line_width, max_line_count=max_line_count)
    validate_options(opts, len(audio))
    session = distributed.start(dist_timeout, device.value, "finished outputs are kept; run again on the inputs "
                                "not done")
    if session.active and opts.reset_policy == "carry":
        raise ConfigError("--reset-policy carry plays the files as one stream, which cannot be shared among "
                          "ranks; run it without torchrun.")
    planned = plan_directory(audio, out, opts, model, overwrite)  # before the model loads: never touch an input
    session.sync("infer-checked")  # under torchrun: no rank writes before every rank checked --out
    jobs = planned.jobs
    ledger = InputLedger([j.path for j in jobs])
    mine = [jobs[i] for i in distributed.share_files([j.path for j in jobs])]
    try:
        m = load_model(model, device=session.device(device.value), dtype=dtype.value, base=base,
                       ttt=ttt_overrides(ttt, ttt_lr, ttt_chunk_size, ttt_layers, ttt_clip))
        say_model_notes(m)
        planned.for_model(m)
        err(check_memory(m, batch_slots(opts, len(jobs)), force))
        run = _run(m, mine, planned, ledger, json_out) if mine else None
    finally:
        planned.plan.cleanup()
    _summarise(run, jobs, mine, ledger, out, json_out)


def _run(m, jobs, planned, ledger, json_out: bool):
    """Runs this process's jobs into --out; a write failure (exit 1) or Ctrl-C (exit 130) is reported here."""
    from .. import distributed
    from ..infer import run_to_directory

    with distributed.progress() as progress:
        done = run_to_directory(m, jobs, planned.opts, planned.out, planned.states, ledger, progress,
                                on_warning=warn, provenance=lambda: distributed.current().record())
        if done.write_error is not None:
            e = done.write_error
            fail(1, f"{e} {len(done.not_run)} input(s) not run: {_names(done.not_run)}.", e.hint, json_out,
                 {"inputs": ledger.to_dict(), "exit_code": 1})
        if done.interrupted:
            again = [r for r in ledger.skipped if r.reason.startswith(("not run", "interrupted"))]
            fail(130, f"interrupted: {len(ledger.done_records)} file(s) finished with outputs in {planned.out} (kept); "
                      f"run again on the others: {_names(again)}.", "run the command again on the inputs not run",
                 json_out, {"inputs": ledger.to_dict(), "exit_code": 130})
        return done.run


def _summarise(run, jobs, mine, ledger, out: Path, json_out: bool) -> None:
    """The summary table (rank 0 for the whole job under torchrun), --json's object, and the exit code."""
    from .. import distributed

    done = _report(run) if run is not None else {}
    parts = distributed.gather_accounts(ledger, [j.index for j in mine], done)
    if parts is None:  # a rank other than 0: rank 0 reports for the job
        raise typer.Exit(1 if any(ledger.records[j.index].failed for j in mine) else 0)
    rows = {int(k): v for p in parts for k, v in p.items()}
    print_table(f"ttt infer: {run.mode}, model {run.model['id']}, TTT {'on' if run.ttt['enabled'] else 'off'}, "
                f"outputs in {out}", ["file", "status", "seconds", "steps", "ms/step", "RTF", "text / reason"],
                [rows[j.index]["row"] for j in jobs])
    summary = (f"{len(ledger.failed)} of {len(jobs)} input(s) failed: "
               + "; ".join(f"{r.path}: {r.reason}" for r in ledger.failed))
    if json_out:
        print_json({"results": [rows[j.index]["json"] for j in jobs], "inputs": ledger.to_dict(),
                    "exit_code": ledger.exit_code, **inputs_error(ledger.exit_code, summary)})
    if ledger.exit_code:
        err(summary)
        raise typer.Exit(1)


def _report(run) -> dict[str, dict]:
    """{job index: its row of the summary table and its result object} (JSON-able: gathered under torchrun)."""
    from ..infer import result_json
    rows = {}
    for r in run.results:
        if r.ok:
            preview = r.text if len(r.text) <= TEXT_PREVIEW else r.text[:TEXT_PREVIEW - 3] + "..."
            row = [r.job.stem, "ok", f"{r.info.seconds:.2f}", r.steps, f"{r.ms_per_step:.1f}",
                   f"{r.realtime_factor:.3f}", preview]
        else:
            row = [r.job.stem, "FAILED", "", "", "", "", r.error]
        rows[str(r.job.index)] = {"row": row, "json": result_json(r, run)}
    return rows


def _names(records, n: int = 5) -> str:
    names = [r.path for r in records]
    return " ".join(names[:n]) + (" ..." if len(names) > n else "") if names else "none"


def register(app: typer.Typer) -> None:
    app.command("infer")(handle_errors(infer_cmd))
