"""`ttt bench`: measure the SPEC §8 performance figures and print them as a table (or JSON)."""

from __future__ import annotations

import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, DeviceOpt, Device, DType, DTypeOpt, JsonOpt, OverwriteOpt, Variant, err, \
    handle_errors, print_json, print_table

if tp.TYPE_CHECKING:  # lazy at run time: `ttt --help` must not import torch
    from ..bench import BenchOptions, BenchResult


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
    model: Annotated[str, typer.Option("--model", "-m", "--preset", help="Model to measure (default: the `bench` "
                                       "preset; `tiny` for a quick check).")] = "bench",
    variant: Annotated[tp.Optional[list[Variant]], typer.Option(
        "--variant", help="Fast-weight variant(s) to measure on the model's base, repeatable (default: all three, "
                          "the model's own first). Figures of mlp / linear-adapter carry _mlp / _adapter.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer steps and shorter documents (< 3 min on 2 CPU cores).")] = False,
    steps: Annotated[tp.Optional[int], typer.Option("--steps", help="Steps per measurement: LMGen steps per variant "
                                                    "and batch size, positions scored by the eval figures.")] = None,
    only: Annotated[tp.Optional[list[str]], typer.Option("--only", help="Measure only these figures (comma-separated "
                                                          "or repeated), e.g. --only step_overhead_b1,ttt_layer_ratio.")]
    = None,
    target: Annotated[tp.Optional[list[str]], typer.Option("--target", help="Override a figure's target, NAME=VALUE "
                                                            "(repeatable), e.g. a stricter one on a faster machine.")]
    = None,
    out: Annotated[tp.Optional[Path], typer.Option("--out", "-o", help="Write the JSON here too.")] = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1)] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure TTT overheads side by side (TTT on/off interleaved A B A B, medians after warm-up), for each
    fast-weight variant attached to the same base model (In-Place names; `_mlp`, `_adapter` suffixes).

    Figures, targets and directions come from one registry (ttt_cli/bench/registry.py). Per variant:
    step_overhead_b1/b8 (LMGen.step TTT on / the same model with rate 0), step_overhead_b8_floor,
    step_ms_p99_b1, ttt_layer_ratio (T = 4096, with the variant's FLOP floor), memory_per_stream_error
    (the memory estimate vs the bytes of the per-stream state). Then eval_block_speedup and
    eval_nll_max_abs_diff (block vs step-by-step scoring), eval_memory_ratio (peak RSS, 30-min vs
    5-min document, separate processes), eval_cache_encode_seconds (second run on cached codes),
    infer_memory_ratio (peak RSS of ttt infer on the tiny model, 60-min vs 5-min file, separate
    processes), scaleout_speedup_2 (eval tokens/s, 2 torchrun processes / 1, whole jobs),
    scaleout_steady_speedup_2 (the same while the ranks score), scaleout_fixed_s_per_rank (the rest:
    launch, imports, model load, merge). --quick measures the same figures on fewer steps and shorter
    inputs (README: Benchmarks).

    Exit code: 0 when every measured target is met, 1 when one is missed (named in the table and
    on stderr), 2 on usage errors.

    Examples:

      ttt bench --quick

      ttt bench --json --out bench.json

      ttt bench --model tiny --steps 32 --only step_overhead_b1,ttt_layer_ratio
    """
    from ..bench import BenchOptions
    from ..bench.registry import parse_targets

    targets = parse_targets(target or [])
    opts = BenchOptions(model=model, device=device.value, dtype=dtype.value, quick=quick, steps=steps, seed=seed,
                        only=only, targets=targets, variants=[v.value for v in variant] if variant else None)
    res, d = _measure(opts, out, overwrite, json_out)
    _show(res, d, json_out)
    raise typer.Exit(res.exit_code)


def _measure(opts: BenchOptions, out: Path | None, overwrite: bool, quiet: bool) -> tuple[BenchResult, dict]:
    """Runs the bench (`--out` checked before it, SPEC §7.1) and writes the JSON there; (result, its dict)."""
    from ..bench import run_bench
    from ..io import write_json
    from ..outputs import OutputPlan, json_with_keys
    from ..progress import make_progress

    plan = OutputPlan(overwrite)
    if out is not None:  # checked before the long measurements, not after them (SPEC §7.1)
        plan.read_model(opts.model)
        plan.write(out, "--out", "the bench JSON", json_with_keys("device", "figures"))
        plan.check().prepare()
    try:
        with make_progress(quiet=quiet) as progress:
            res = run_bench(opts, progress)
        d = res.to_dict()
        if out is not None:
            write_json(out, d)
    finally:
        plan.cleanup()
    return res, d


def _show(res: BenchResult, d: dict, json_out: bool) -> None:
    """Prints the result: its JSON, or a table; notes and missed targets on stderr."""
    from ..bench.registry import spec

    if json_out:
        print_json(d)
    else:
        rows = [[f.name, f.value, "" if f.target is None else f"{spec(f.name).direction} {f.target:g}",
                 "-" if f.passed is None else ("pass" if f.passed else "MISSED"), _note(f.detail)]
                for f in res.figures]
        print_table(f"ttt bench on {res.device} ({res.model}, {res.seconds:.0f} s)",
                    ["figure", "value", "target", "met", "compared with"], rows)
    for note in res.notes:
        err(note)
    if res.missed:
        err("targets missed: " + "; ".join(
            f"{f.name} = {f.value:.4g} (target {spec(f.name).direction} {f.target:g}{', ' + f.error if f.error else ''})"
            for f in res.missed))


def register(app: typer.Typer) -> None:
    app.command("bench")(handle_errors(bench_cmd))
