"""`ttt bench`: measure the SPEC §8 performance figures and print them as a table (or JSON)."""

from __future__ import annotations

import typing as tp
from pathlib import Path
from typing import Annotated

import typer

from .common import DebugOpt, DeviceOpt, Device, DType, DTypeOpt, JsonOpt, OverwriteOpt, err, handle_errors, \
    print_json, print_table


def bench_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to measure (default: the `bench` preset).")] = "bench",
    quick: Annotated[bool, typer.Option("--quick", help="Fewer steps and shorter documents (< 3 min on 2 CPU cores).")] = False,
    steps: Annotated[tp.Optional[int], typer.Option("--steps", help="LMGen steps per variant and batch size.")] = None,
    out: Annotated[tp.Optional[Path], typer.Option("--out", "-o", help="Write the JSON here too.")] = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1)] = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure TTT overheads side by side (variants interleaved A B A B, medians after warm-up).

    Figures: step_overhead_b1/b8 (LMGen.step TTT on / off), step_overhead_b8_floor, step_ms_p99_b1,
    eval_block_speedup and eval_nll_max_abs_diff (block vs step-by-step scoring), eval_memory_ratio
    (peak RSS, 30-min vs 5-min document, separate processes), eval_cache_encode_seconds (second run
    on cached codes), ttt_layer_ratio (TTT layer vs plain gating, T = 4096).

    Examples:

      ttt bench --quick

      ttt bench --json --out bench.json
    """
    from ..bench import BenchOptions, run_bench
    from ..io import write_json
    from ..outputs import OutputPlan, json_with_keys
    from ..progress import make_progress

    plan = OutputPlan(overwrite)
    if out is not None:  # checked before the long measurements, not after them (SPEC §7.1)
        plan.read_model(model)
        plan.write(out, "--out", "the bench JSON", json_with_keys("device", "figures"))
        plan.check().prepare()
    try:
        with make_progress() as progress:
            res = run_bench(BenchOptions(model=model, device=device.value, dtype=dtype.value, quick=quick,
                                         steps=steps, seed=seed), progress)
        d = res.to_dict()
        if out is not None:
            write_json(out, d)
    finally:
        plan.cleanup()
    if json_out:
        print_json(d)
    else:
        rows = [[f.name, f.value, "" if f.target is None else f.target,
                 "-" if f.passed is None else ("pass" if f.passed else "FAIL")] for f in res.figures]
        print_table(f"ttt bench on {res.device} ({res.model}, {res.seconds:.0f} s)", ["figure", "value", "target", "pass"], rows)
    failed = [f.name for f in res.figures if f.passed is False]
    if failed:
        err(f"targets missed: {', '.join(failed)}")


def register(app: typer.Typer) -> None:
    app.command("bench")(handle_errors(bench_cmd))
