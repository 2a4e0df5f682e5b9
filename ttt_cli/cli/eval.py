"""`ttt eval librilight`: long-context perplexity with fast-weight reset policies (SPEC §6)."""

from __future__ import annotations

import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import (AudioStream, BaseOpt, DebugOpt, Device, DistTimeoutOpt, DeviceOpt, DType, DTypeOpt, err, fail, ForceOpt,
                     ForceStateOpt, handle_errors, inputs_error, JsonOpt, ModelOpt, OverwriteOpt, print_json,
                     print_table, ResumeOpt, SeedOpt, TelemetryOpt, TextStream, TTTChunkOpt, TTTClipOpt, TTTLayersOpt,
                     TTTLrOpt, TTTOpt, warn, WarmStartOpt)

eval_app = typer.Typer(name="eval", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       help="Evaluations: long-context perplexity on LibriLight-style audiobooks (librilight); "
                            "long-form transcription WER (asr).")


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def librilight_cmd(
    data: Annotated[Path, typer.Argument(help="Dataset directory: DATA/<speaker>/<book>/<file>.flac (+ <file>.json).")],
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
    from .. import distributed
    from ..units import parse_seconds
    from evals.protocol import EvalOptions, evaluate_librilight
    from .common import check_memory, set_seed, ttt_overrides

    session = distributed.start(dist_timeout, device.value, "finished documents are kept: run the same command "
                                "with --resume (any number of processes) to continue")
    opts = EvalOptions(
        data=data, out=out, model=model, policies=list(policy or ["document"]),
        max_seconds=parse_seconds(max_seconds), min_seconds=parse_seconds(min_seconds), limit_books=limit_books,
        block_steps=block_steps, bin_seconds=parse_seconds(bin_seconds), audio_stream=audio_stream.value,
        text_stream=text_stream.value, codes_cache=codes_cache, use_codes_cache=not no_codes_cache,
        save_token_nll=save_token_nll, resume=resume, overwrite=overwrite, init_state=init_state,
        force_state=force_state, device=session.device(device.value), dtype=dtype.value,
        ttt=ttt_overrides(ttt, ttt_lr, ttt_chunk_size, ttt_layers, ttt_clip) or None, seed=seed, base=base,
        telemetry=telemetry)

    def load():
        from ..models.loader import load_model
        set_seed(seed)
        m = load_model(opts.model, device=opts.device, dtype=opts.dtype, ttt=opts.ttt, base=opts.base)
        for note in m.notes:
            err(note)
        for note in m.warnings:  # also in results.json; `warn` says each once
            warn(note)
        err(check_memory(m, 1, force))
        return m

    with distributed.progress(quiet=json_out) as progress:
        res = evaluate_librilight(opts, progress, model=load)
    if distributed.quiet():  # rank 0 reports for the job; this rank's exit code counts in the agreed one
        raise typer.Exit(res.exit_code)
    for w in res.warnings:
        warn(w)
    if res.interrupted:
        fail(130, f"interrupted: {res.documents_done} of {res.documents_total} document(s) finished and kept "
                  f"(results.json says so). Run the same command with --resume to continue.",
             "run the same command with --resume", json_out,
             {**res.results, "out": str(res.out), "files": res.files, "failed": res.failed, "exit_code": 130})
    if json_out:
        print_json({**res.results, "out": str(res.out), "files": res.files, "failed": res.failed,
                    "exit_code": res.exit_code,
                    **inputs_error(res.exit_code, f"{len(res.failed)} input(s) skipped: " + "; ".join(res.failed))})
    else:
        rows = [[p.name, _fmt(p.nll), _fmt(p.perplexity, ".2f"), _fmt(p.nll_semantic), _fmt(p.nll_acoustic),
                 *([_fmt(p.nll_text)] if any(q.nll_text is not None for q in res.policies) else []),
                 p.tokens, _fmt(p.steps_per_second, ".1f")] for p in res.policies]
        cols = ["policy", "NLL", "PPL", "NLL semantic", "NLL acoustic",
                *(["NLL text"] if any(q.nll_text is not None for q in res.policies) else []), "tokens", "steps/s"]
        print_table(f"{res.documents_done}/{res.documents_total} document(s), "
                    f"{res.results['dataset']['seconds']:.1f} s of audio", cols, rows)
        err(f"wrote {', '.join(res.files[:3])}" + (f" and {len(res.files) - 3} token NLL file(s)"
                                                   if len(res.files) > 3 else ""))
    if res.failed and not json_out:
        err(f"{len(res.failed)} input(s) skipped:")
        for f in res.failed:
            err(f"  {f}")
    raise typer.Exit(res.exit_code)


def register(app: typer.Typer) -> None:
    from .eval_asr import asr_cmd
    eval_app.command("librilight")(handle_errors(librilight_cmd))
    eval_app.command("asr")(handle_errors(asr_cmd))
    app.add_typer(eval_app, name="eval")
