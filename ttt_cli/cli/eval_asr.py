"""`ttt eval asr`: long-form transcription quality (WER) with fast-weight reset policies (SPEC §5.7)."""

from __future__ import annotations

import enum
import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import (BaseOpt, BootstrapOpt, DebugOpt, Device, DeviceOpt, DistTimeoutOpt, DType, DTypeOpt, err,
                     eval_model_loader, fmt_interval, fmt_or_dash, fmt_vs_off, ForceOpt, ForceStateOpt,
                     interval_notes, JsonOpt, ModelOpt, OverwriteOpt, print_table, report_eval, ResumeOpt, SeedOpt,
                     TTTChunkOpt, TTTClipOpt, TTTLayersOpt, TTTLrOpt, TTTOpt, WarmStartOpt)


class AsrMode(str, enum.Enum):
    auto = "auto"
    stt = "stt"
    transcribe = "transcribe"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


# One piece: a Typer command whose signature is its option list; the body only maps the flags to
# AsrOptions, calls `evaluate_asr` and reports (`_table`, `report_eval`).
def asr_cmd(
    data: Annotated[Path, typer.Argument(readable=False, help="A directory of audio files, each with a same-stem .txt reference "
                                              "(any depth), or a .jsonl manifest of {\"audio\": PATH, \"text\": "
                                              "REFERENCE} lines.")],
    model: ModelOpt = None,
    base: BaseOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (results.json, wer.csv, wer.png, "
                                      "hyp/<policy>/<recording>.txt|.json).")] = Path("results/asr"),
    policy: Annotated[tp.Optional[list[str]], typer.Option(
        "--policy", "-p", help="Fast-weight reset policy, repeatable: document (reset at each recording's start) | "
                               "every:<N>s | every:<N> (steps) | off (no TTT: the baseline). Default: document.")]
    = None,
    mode: Annotated[AsrMode, typer.Option("--mode", help="auto: stt for STT checkpoints (dep_q = 0), else "
                                          "transcribe (the input forced on Moshi's own stream).")] = AsrMode.auto,
    pad_before: Annotated[tp.Optional[str], typer.Option("--pad-before", help="Silence before each recording "
                                                         "(default 1s, as kyutai's STT evaluation).")] = None,
    pad_after: Annotated[tp.Optional[str], typer.Option("--pad-after", help="Silence after each recording (default "
                                                        "the text delay + 0.5s: stt_config.audio_delay_seconds, or "
                                                        "2s in transcribe mode).")] = None,
    bin_seconds: Annotated[str, typer.Option("--bin-seconds", help="Width of the WER position bins.")] = "60",
    whole_file_seconds: Annotated[str, typer.Option("--whole-file-seconds", help="Recordings up to this long are "
                                                    "decoded whole (as moshi.run_inference), longer ones in bounded "
                                                    "pieces.")] = "600",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    init_state: WarmStartOpt = None,
    force_state: ForceStateOpt = False,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    ttt: TTTOpt = True,
    ttt_lr: TTTLrOpt = None,
    ttt_chunk_size: TTTChunkOpt = None,
    ttt_layers: TTTLayersOpt = None,
    ttt_clip: TTTClipOpt = None,
    seed: SeedOpt = 0,
    bootstrap: BootstrapOpt = 1000,
    force: ForceOpt = False,
    dist_timeout: DistTimeoutOpt = 600.0,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Word error rate of streaming transcription on long recordings, one pass per fast-weight reset policy.

    Each recording is streamed frame by frame exactly as `ttt infer --mode stt|transcribe` does (greedy),
    with 1 s of silence before and the text delay + 0.5 s after it, and scored against its reference
    with whisper's English normaliser and jiwer: corpus WER (total errors / total reference words),
    the mean of per-file WERs, CER, S/D/I, WER per position bin, and the long-form failure signals
    (longest deletion run, longest stretch without a word, repetition rate).

    Examples:

      ttt eval asr examples/asr --model tiny-stt -p off -p document --out results/asr

      ttt eval asr rev16/ --model kyutai/stt-1b-en_fr -p off -p document -p every:5m --bin-seconds 300

      ttt eval asr talks.jsonl --model kyutai/moshiko-pytorch-bf16 --mode transcribe --out results/ted

      ttt eval asr rev16/ --out results/rev16 --resume

      torchrun --nproc-per-node 8 -m ttt_cli eval asr rev16/ --out results/rev16   (one rank per GPU)
    """
    from .. import distributed
    from ..units import parse_seconds
    from evals.asr.options import AsrOptions
    from evals.asr.protocol import evaluate_asr
    from .common import ttt_overrides

    session = distributed.start(dist_timeout, device.value, "finished recordings are kept: run the same command "
                                "with --resume (any number of processes) to continue")
    opts = AsrOptions(
        data=data, out=out, model=model, policies=list(policy or ["document"]), mode=mode.value,
        pad_before=None if pad_before is None else parse_seconds(pad_before),
        pad_after=None if pad_after is None else parse_seconds(pad_after),
        bin_seconds=parse_seconds(bin_seconds), whole_file_seconds=parse_seconds(whole_file_seconds),
        resume=resume, overwrite=overwrite, init_state=init_state, force_state=force_state,
        device=session.device(device.value), dtype=dtype.value,
        ttt=ttt_overrides(ttt, ttt_lr, ttt_chunk_size, ttt_layers, ttt_clip) or None, base=base,
        seed=seed, bootstrap=bootstrap)

    with distributed.progress(quiet=json_out) as progress:
        res = evaluate_asr(opts, progress, model=eval_model_loader(opts, seed, force))
    if distributed.quiet():  # rank 0 reports for the job; this rank's exit code counts in the agreed one
        raise typer.Exit(res.exit_code)
    report_eval(res, json_out, "recording", lambda: _table(res))


def _table(res) -> None:
    """The policies' table (WER with its 95% interval and difference with off, CER, S/D/I, failure signals,
    real-time factor), why an interval is missing, and the files written."""
    rows = [[p.name, _pct(p.wer), fmt_interval(p.ci, ".1f", 100), fmt_vs_off(p.vs_off, ".1f", 100), _pct(p.wer_mean),
             _pct(p.cer), f"{p.substitutions}/{p.deletions}/{p.insertions}", p.words,
             fmt_or_dash(p.longest_deletion_run, "d"), fmt_or_dash(p.longest_gap_s, ".1f"),
             fmt_or_dash(p.repetition_rate, ".2f"), fmt_or_dash(p.realtime_factor, ".2f")] for p in res.policies]
    print_table(f"{res.documents_done}/{res.documents_total} recording(s), "
                f"{res.results['dataset']['seconds']:.1f} s of audio, {res.results['protocol']['mode']} "
                f"(WER/CER in %; maxima over recordings)",
                ["policy", "WER", "95% CI", "vs off [95% CI]", "mean", "CER", "S/D/I", "words", "del run", "gap s",
                 "repeat", "RTF"], rows)
    for note in interval_notes(res):
        err(note)
    err(f"wrote {', '.join(res.files)} and the hypotheses in {res.out / 'hyp'}")
