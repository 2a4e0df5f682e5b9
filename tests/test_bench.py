"""`ttt bench`: the figure registry (SPEC §8 names, targets, directions), a quick run on `tiny` (figures,
JSON schema, targets judged) and the exit code (0 all met, 1 one missed and named, 2 usage errors)."""

import json
import math

import pytest
from typer.testing import CliRunner

from ttt_cli.bench_figures import FIGURES, judge, parse_targets, spec
from ttt_cli.cli.app import app
from ttt_cli.errors import ConfigError

# SPEC §8 / §5.1: name -> (target, direction)
SPEC_TARGETS = {
    "step_overhead_b1": (1.10, "<="), "step_overhead_b8": (1.15, "<="), "eval_block_speedup": (10.0, ">="),
    "eval_nll_max_abs_diff": (1e-4, "<="), "eval_memory_ratio": (1.10, "<="), "eval_cache_encode_seconds": (0.5, "<="),
    "ttt_layer_ratio": (2.0, "<="), "infer_memory_ratio": (1.10, "<="), "step_overhead_b8_floor": (None, "<="),
    "step_ms_p99_b1": (None, "<="), "telemetry_overhead_b1": (1.02, "<="),
}
QUICK = ["step_overhead_b1", "step_ms_p99_b1", "ttt_layer_ratio", "eval_block_speedup", "eval_nll_max_abs_diff",
         "telemetry_overhead_b1"]


def bench(*args):
    return CliRunner().invoke(app, ["bench", "--model", "tiny", "--steps", "16", *map(str, args)])


def test_registry_holds_the_spec_figures():
    for name, (target, direction) in SPEC_TARGETS.items():
        s = spec(name)
        assert (s.target, s.direction) == (target, direction), name
        assert s.unit and s.meaning
    assert all(f.direction in ("<=", ">=") for f in FIGURES.values())
    mlp = spec("ttt_layer_ratio_mlp")  # a variant's figure shares its base figure's entry
    assert (mlp.name, mlp.target, mlp.direction) == ("ttt_layer_ratio_mlp", 2.0, "<=")
    assert spec("step_overhead_b8_adapter").floor == "step_overhead_b8_floor_adapter"
    with pytest.raises(ConfigError, match="unknown bench figure"):
        spec("ttt_layer_ratio_lora")
    # judging: direction, overrides, the batch-8 memory floor, a failed measurement
    assert judge("ttt_layer_ratio", 1.9, {}) == (2.0, True) and judge("ttt_layer_ratio", 2.1, {}) == (2.0, False)
    assert judge("eval_block_speedup", 9.0, {}) == (10.0, False) and judge("eval_block_speedup", 11, {})[1]
    assert judge("ttt_layer_ratio", 1.9, {}, {"ttt_layer_ratio": 1.5}) == (1.5, False)
    assert judge("step_overhead_b8", 1.2, {"step_overhead_b8_floor": 1.1}) == (1.15, True)  # within 10% of floor
    assert judge("step_overhead_b8", 1.2, {"step_overhead_b8_floor": 1.0}) == (1.15, False)
    assert judge("step_ms_p99_b1", 99.0, {}) == (None, None)
    assert judge("ttt_layer_ratio", math.nan, {}) == (2.0, False)
    assert parse_targets(["ttt_layer_ratio=1.5", "eval_block_speedup = 3"]) == {"ttt_layer_ratio": 1.5,
                                                                                "eval_block_speedup": 3.0}
    for bad in ("ttt_layer_ratio", "ttt_layer_ratio=x", "nope=1", "ttt_layer_ratio=inf"):
        with pytest.raises(ConfigError):
            parse_targets([bad])


def test_quick_bench_on_tiny(tmp_path):
    """Figures present with the JSON schema of SPEC §8, targets judged by the registry, exit 0 when all are met."""
    generous = [f"--target={n}={0 if spec(n).direction == '>=' else 1e9}" for n in QUICK if spec(n).target]
    out = tmp_path / "bench.json"
    r = bench("--only", ",".join(QUICK), *generous, "--json", "--out", out)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert json.loads(out.read_text()) == d and d["exit_code"] == 0
    assert {"device", "versions", "figures"} <= set(d) and {"ttt", "moshi", "torch"} <= set(d["versions"])
    assert [f["name"] for f in d["figures"]] == QUICK  # registry order, only what was asked
    for f in d["figures"]:
        assert {"name", "value", "target", "pass", "direction", "unit"} <= set(f)
        assert isinstance(f["value"], float) and math.isfinite(f["value"]) and f["value"] >= 0
        if spec(f["name"]).target is None:
            assert f["target"] is None and f["pass"] is None
        else:
            assert f["pass"] is True and f["target"] in (0, 1e9)
    by = {f["name"]: f for f in d["figures"]}
    assert by["eval_nll_max_abs_diff"]["value"] < 1e-4  # block and step-by-step scoring agree on tiny
    assert by["step_overhead_b1"]["on"]["steps"] == by["step_overhead_b1"]["off"]["steps"] == 16
    assert by["ttt_layer_ratio"]["T"] == 4096
    assert by["telemetry_overhead_b1"]["with_telemetry"]["steps"] == by["telemetry_overhead_b1"]["without"]["steps"]


def test_missed_target_exits_1_and_is_named(tmp_path):
    r = bench("--only", "eval_nll_max_abs_diff,eval_block_speedup", "--target", "eval_block_speedup=1e9")
    assert r.exit_code == 1, r.output
    assert "MISSED" in r.stderr and "targets missed: eval_block_speedup" in r.stderr
    assert "eval_nll_max_abs_diff" not in r.stderr.split("targets missed:")[1]  # only the missed one is named


@pytest.mark.parametrize("args,message", [
    (["--only", "nonsense"], "unknown bench figure"),
    (["--target", "ttt_layer_ratio"], "NAME=NUMBER"),
    (["--only", "ttt_layer_ratio", "--target", "eval_block_speedup=3"], "not measured in this run"),
    (["--steps", "0", "--only", "ttt_layer_ratio"], "--steps"),
])
def test_usage_errors_exit_2(args, message):
    r = bench(*args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_gpu_figures_are_skipped_with_a_note_without_cuda():
    """SPEC §5.5: the GPU figures are named and skipped (not failed) on a CPU run; the exit code stays 0."""
    r = bench("--device", "cpu", "--only", "gpu_rtf_b1,gpu_memory_per_stream_error", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["figures"] == [] and d["exit_code"] == 0
    assert d["notes"] == ["GPU figures (gpu_rtf_b1, gpu_memory_per_stream_error) skipped: no CUDA device in this "
                          "run (--device cpu)."]
    assert "skipped: no CUDA" in r.stderr


def test_gpu_figure_arithmetic():
    """The device-independent part of the GPU figures, against hand computations."""
    from ttt_cli.bench_gpu import memory_error, realtime_factor

    assert realtime_factor(40.0) == pytest.approx(2.0)  # an 80 ms frame in 40 ms: twice real time
    assert realtime_factor(80.0) == pytest.approx(1.0)
    # TTT model grows 1000 + 300 bytes per added stream, plain moshi 300: the fast weights are 1000 bytes
    err, measured = memory_error((5000, 6300), (4000, 4300), 1050)
    assert measured == 1000 and err == pytest.approx(50 / 1050)
