"""`ttt bench`: measure the SPEC §8 performance figures and print them as a table (or JSON)."""

from __future__ import annotations

import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, DeviceOpt, Device, DType, DTypeOpt, JsonOpt, OverwriteOpt, Variant, err, \
    handle_errors, print_json, print_table


def _note(detail: dict) -> str:
    """What a figure is compared with, for the table: FLOP floors, memory floors, predicted bytes."""
    if "flop_floor" in detail:
        return f"FLOP floor {detail['flop_floor']:.3g}"
    if "predicted_bytes" in detail:
        return f"measured {detail['measured_bytes']} B, predicted {detail['predicted_bytes']} B"
    if "floor" in detail:
        return f"memory floor {detail['floor']:.3g}"
    return ""


def bench_cmd(
    model: Annotated[str, typer.Option("--model", "--preset", "-m", help="Model to measure (default: the `bench` preset).")] = "bench",
    variant: Annotated[tp.Optional[list[Variant]], typer.Option(
        "--variant", help="Fast-weight variant(s) to measure on the model's base, repeatable (default: all three, "
                          "the model's own first). Figures of mlp / linear-adapter carry _mlp / _adapter.")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the eval figures (scoring speed, memory on long "
                                                            "documents, codes cache).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer steps and shorter documents (< 3 min on 2 CPU cores).")] = False,
    steps: Annotated[tp.Optional[int], typer.Option("--steps", help="LMGen steps per variant and batch size.")] = None,
    out: Annotated[tp.Optional[Path], typer.Option("--out", "-o", help="Write the JSON here too.")] = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure TTT overheads side by side (TTT on/off interleaved A B A B, medians after warm-up), for each
    fast-weight variant attached to the same base model (In-Place names; `_mlp`, `_adapter` suffixes).

    Per variant: step_overhead_b1/b8 (LMGen.step TTT on / the same model with rate 0), step_overhead_b8_floor,
    step_ms_p99_b1, ttt_layer_ratio (T = 4096, with the variant's FLOP floor), memory_per_stream_error
    (the memory estimate vs the bytes of the per-stream state). Then
    eval_block_speedup and eval_nll_max_abs_diff (block vs step-by-step scoring), eval_memory_ratio
    (peak RSS, 30-min vs 5-min document, separate processes), eval_cache_encode_seconds (second run
    on cached codes).

    Examples:

      ttt bench --quick

      ttt bench --json --out bench.json
    """
    from ..bench import BenchOptions, run_bench
    from ..io import refuse_overwrite, write_json
    from ..progress import make_progress

    if out is not None:
        refuse_overwrite([out], overwrite)
    with make_progress() as progress:
        res = run_bench(BenchOptions(model=model, device=device.value, dtype=dtype.value, quick=quick,
                                     steps=steps, seed=seed, variants=[v.value for v in variant] if variant else None,
                                     eval=not no_eval), progress)
    d = res.to_dict()
    if out is not None:
        write_json(out, d)
    if json_out:
        print_json(d)
    else:
        rows = [[f.name, f.value, "" if f.target is None else f.target,
                 "-" if f.passed is None else ("pass" if f.passed else "FAIL"), _note(f.detail)] for f in res.figures]
        print_table(f"ttt bench on {res.device} ({res.model}, {res.seconds:.0f} s)",
                    ["figure", "value", "target", "pass", "compared with"], rows)
    failed = [f.name for f in res.figures if f.passed is False]
    if failed:
        err(f"targets missed: {', '.join(failed)}")


def register(app: typer.Typer) -> None:
    app.command("bench")(handle_errors(bench_cmd))
