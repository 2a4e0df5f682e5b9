"""`ttt eval librilight`: long-context perplexity with fast-weight reset policies (SPEC §6)."""

from __future__ import annotations

import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import (AudioStream, BaseOpt, BootstrapOpt, DebugOpt, Device, DistTimeoutOpt, DeviceOpt, DType, DTypeOpt,
                     err, eval_model_loader, fmt_interval, fmt_or_dash, fmt_vs_off, ForceOpt, ForceStateOpt,
                     handle_errors, interval_notes, JsonOpt, ModelOpt, OverwriteOpt, print_table, report_eval,
                     ResumeOpt, SeedOpt, TelemetryOpt, TextStream, TTTChunkOpt, TTTClipOpt, TTTLayersOpt, TTTLrOpt,
                     TTTOpt, WarmStartOpt)

eval_app = typer.Typer(name="eval", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       help="Evaluations: long-context perplexity on LibriLight-style audiobooks (librilight); "
                            "long-form transcription WER (asr).")


# One piece: a Typer command whose signature is its option list; the body only maps the flags to
# EvalOptions, calls `evaluate_librilight` and reports (`_table`, `report_eval`).
def librilight_cmd(
    data: Annotated[Path, typer.Argument(readable=False, help="Dataset directory: DATA/<speaker>/<book>/<file>.flac (+ <file>.json).")],
    model: ModelOpt = None,
    base: BaseOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (results.json, curve.csv, curve.png).")]
    = Path("results/librilight"),
    policy: Annotated[tp.Optional[list[str]], typer.Option(
        "--policy", "-p", help="Fast-weight reset policy, repeatable: document | file | every:<N>s | every:<N> "
                               "(steps) | never | off. Default: document.")] = None,
    max_seconds: Annotated[str, typer.Option("--max-seconds", help="Cut each document there (30s, 10m, 1h).")]
    = "3600",
    min_seconds: Annotated[str, typer.Option("--min-seconds", help="Drop books shorter than this.")] = "0",
    limit_books: Annotated[tp.Optional[int], typer.Option("--limit-books", help="Score only the first N books.")]
    = None,
    block_steps: Annotated[int, typer.Option("--block-steps", help="Steps per main-transformer call.")] = 250,
    bin_seconds: Annotated[str, typer.Option("--bin-seconds", help="Width of the curve's position bins.")] = "60",
    audio_stream: Annotated[AudioStream, typer.Option("--audio-stream", help="moshi: audio on Moshi's own stream, "
                                                      "scored by the depformer; user: input only.")]
    = AudioStream.moshi,
    text_stream: Annotated[TextStream, typer.Option("--text-stream", help="zero: text -1 (no token); pad: the "
                                                    "padding id, then scored too.")] = TextStream.zero,
    codes_cache: Annotated[tp.Optional[Path], typer.Option("--codes-cache", help="Mimi codes cache directory "
                                                           "(default: under the user cache, $TTT_CACHE/codes).")]
    = None,
    no_codes_cache: Annotated[bool, typer.Option("--no-codes-cache", help="Encode again, store nothing.")] = False,
    save_token_nll: Annotated[bool, typer.Option("--save-token-nll", help="Write token_nll/<policy>/<speaker>/"
                                                 "<book>.safetensors (nll \\[dep_q, T], codes \\[K, T]).")] = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    init_state: WarmStartOpt = None,
    force_state: ForceStateOpt = False,
    telemetry: TelemetryOpt = None,
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
    """Long-context perplexity on LibriLight-style audiobooks, one pass per fast-weight reset policy.

    Each book's files are concatenated in natural order into one document, encoded with Mimi
    (cached), and scored with teacher forcing in streaming mode: NLL per step and codebook of
    Moshi's audio stream, as a curve over the position in the document.

    Examples:

      ttt eval librilight DATA --model tiny -p document -p off --out results/tiny

      ttt eval librilight DATA -p document -p file -p every:30s -p never -p off --max-seconds 30m

      ttt eval librilight DATA --out results/run1 --resume

      ttt eval librilight DATA --model tiny -p every:2s --telemetry results/series   (per policy and document)

      torchrun --nproc-per-node 8 -m ttt_cli eval librilight DATA --out results/run1   (one rank per GPU)
    """
    from .. import timeline
    timeline.begin()
    import torch  # noqa: F401 - first: the run's timeline tells torch's import apart from ours
    timeline.mark("torch_imported")
    from .. import distributed
    from ..units import parse_seconds
    from evals.librilight.options import EvalOptions
    from evals.librilight.protocol import evaluate_librilight
    from .common import ttt_overrides

    timeline.mark("imported")
    session = distributed.start(dist_timeout, device.value, "finished documents are kept: run the same command "
                                "with --resume (any number of processes) to continue")
    timeline.mark("joined")
    opts = EvalOptions(
        data=data, out=out, model=model, policies=list(policy or ["document"]),
        max_seconds=parse_seconds(max_seconds), min_seconds=parse_seconds(min_seconds), limit_books=limit_books,
        block_steps=block_steps, bin_seconds=parse_seconds(bin_seconds), audio_stream=audio_stream.value,
        text_stream=text_stream.value, codes_cache=codes_cache, use_codes_cache=not no_codes_cache,
        save_token_nll=save_token_nll, resume=resume, overwrite=overwrite, init_state=init_state,
        force_state=force_state, device=session.device(device.value), dtype=dtype.value,
        ttt=ttt_overrides(ttt, ttt_lr, ttt_chunk_size, ttt_layers, ttt_clip) or None, seed=seed, base=base,
        telemetry=telemetry, bootstrap=bootstrap)

    with distributed.progress(quiet=json_out) as progress:
        res = evaluate_librilight(opts, progress, model=eval_model_loader(opts, seed, force))
    if distributed.quiet():  # rank 0 reports for the job; this rank's exit code counts in the agreed one
        raise typer.Exit(res.exit_code)
    report_eval(res, json_out, "document", lambda: _table(res))


def _table(res) -> None:
    """The policies' table (NLL with its 95% interval and difference with off, perplexity, per group, tokens,
    speed), why an interval is missing, and the files written."""
    text = any(q.nll_text is not None for q in res.policies)
    rows = [[p.name, fmt_or_dash(p.nll), fmt_interval(p.ci, ".3f"), fmt_vs_off(p.vs_off, ".3f"),
             fmt_or_dash(p.perplexity, ".2f"), fmt_or_dash(p.nll_semantic), fmt_or_dash(p.nll_acoustic),
             *([fmt_or_dash(p.nll_text)] if text else []),
             p.tokens, fmt_or_dash(p.steps_per_second, ".1f")] for p in res.policies]
    cols = ["policy", "NLL", "95% CI", "vs off [95% CI]", "PPL", "NLL semantic", "NLL acoustic",
            *(["NLL text"] if text else []), "tokens", "steps/s"]
    print_table(f"{res.documents_done}/{res.documents_total} document(s), "
                f"{res.results['dataset']['seconds']:.1f} s of audio", cols, rows)
    for note in interval_notes(res):
        err(note)
    err(f"wrote {', '.join(res.files[:3])}" + (f" and {len(res.files) - 3} token NLL file(s)"
                                               if len(res.files) > 3 else ""))


def register(app: typer.Typer) -> None:
    from .eval_asr import asr_cmd
    eval_app.command("librilight")(handle_errors(librilight_cmd))
    eval_app.command("asr")(handle_errors(asr_cmd))
    app.add_typer(eval_app, name="eval")
