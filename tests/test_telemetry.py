"""The update series (SPEC §3.7, `--telemetry`), checked against references outside the telemetry code:
fast-weight snapshots written by `export-state --at` at chunk boundaries and θ0 read from the checkpoint file
(every variant), the clip formula, an `every:` policy's reset steps by hand, a non-finite injection, and the
same file alone vs in a batch."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safety_helpers import cli
from ttt_cli.telemetry import COLUMNS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HELLO, WEATHER = EXAMPLES / "hello.wav", EXAMPLES / "weather.flac"
REL = 1e-5


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        r = csv.reader(f)
        assert next(r) == list(COLUMNS)
        return [dict(zip(COLUMNS, row)) for row in r]


def checkpoint_theta0(preset: str) -> dict[str, torch.Tensor]:
    """θ0 read from the preset's own ttt.safetensors, keyed like the snapshot (`layers.{i}.<name>`)."""
    from ttt_cli.models.resolver import resolve
    res = resolve(preset)
    raw = load_file(str(res.directory / res.config["ttt"]["ttt_name"]))
    out = {}
    for k, v in raw.items():
        parts = k.split(".")  # transformer.layers.{i}.<...>
        i, rest = parts[2], ".".join(parts[3:])
        if rest == "gating.w_down":
            out[f"layers.{i}.w"] = v.double()
        elif rest.startswith("ttt.") and rest[4:] in ("W1", "b1", "W2", "b2"):  # mlp
            out[f"layers.{i}.{rest[4:]}"] = v.double()
        elif ".ttt_adapter." in rest and rest.rsplit(".", 1)[1] in ("W1", "b1"):  # linear-adapter
            target, name = rest.split(".ttt_adapter.")
            out[f"layers.{i}.{target}.{name}"] = v.double()
    assert out, f"no θ0 tensors found in {preset}'s checkpoint"
    return out


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def assert_rel(a: float, b: float, rel: float = REL, what: str = "") -> None:
    assert abs(a - b) <= rel * max(abs(b), 1e-12), f"{what}: {a} vs {b}"


# -- against snapshots, every variant -------------------------------------------------------------------

CASES = {  # preset, chunk steps, extra options
    "inplace": ("tiny", 16, []),
    "inplace-clipped": ("tiny", 16, ["--ttt-clip", "100"]),
    "mlp": ("tiny-mlp", 8, []),
    "adapter": ("tiny-adapter", 8, []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_series_equals_export_state_snapshots(case, tmp_path):
    preset, C, extra = CASES[case]
    at = [C * k for k in (1, 2, 3)]  # chunk boundaries, in steps
    res = cli("export-state", HELLO, "--model", preset, "--out", tmp_path / "s", "--telemetry", tmp_path / "t",
              *[x for s in at for x in ("--at", f"{s / 12.5}")], *extra, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    item = out["items"][0]
    assert item["telemetry"] == {"csv": str(tmp_path / "t" / "hello.updates.csv"),
                                 "png": str(tmp_path / "t" / "hello.updates.png")}
    assert (tmp_path / "t" / "hello.updates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(item["telemetry"]["csv"])
    theta0 = checkpoint_theta0(preset)
    snaps = [theta0] + [{k: v.double() for k, v in load_file(str(tmp_path / "s" / f"hello.at-{s / 12.5:g}s.safetensors")).items()}
                        for s in at]
    layers = sorted({k.split(".")[1] for k in theta0}, key=int)
    assert sorted({r["layer"] for r in rows}, key=int) == layers
    for i in layers:
        names = [k for k in theta0 if k.split(".")[1] == i]
        mine = [r for r in rows if r["layer"] == i]
        assert [r["event"] for r in mine[:3]] == ["update"] * 3
        n0 = norm(theta0[k] for k in names)
        for k, r in enumerate(mine[:3]):
            before, after = snaps[k], snaps[k + 1]
            assert (int(r["update"]), int(r["step"]), int(r["tokens"]), r["stream"]) == (k, at[k], C, "0")
            assert float(r["time_s"]) == at[k] / 12.5
            assert_rel(float(r["step_norm"]), norm(after[n] - before[n] for n in names), what=f"step_norm {i}/{k}")
            assert_rel(float(r["drift"]), norm(after[n] - theta0[n] for n in names) / n0, what=f"drift {i}/{k}")
            assert_rel(float(r["w_norm"]), norm(after[n] for n in names), what=f"w_norm {i}/{k}")
            if preset != "tiny":  # variants have no clip: delta_norm is the step norm
                assert float(r["delta_norm"]) == float(r["step_norm"]) and float(r["clip_scale"]) == 1.0
    if case.startswith("inplace"):
        cfg = out["ttt"]
        lr, clip, eps = cfg["lr"], cfg["delta_clip_fro_norm"], cfg["delta_clip_epsilon"]
        ups = [r for r in rows if r["event"] == "update"]
        for r in ups:
            delta, scale = float(r["delta_norm"]), float(r["clip_scale"])
            want = 1.0 if clip is None else min(1.0, clip / (delta + eps))  # SPEC §3.3's clip, by hand
            assert_rel(scale, want, 1e-6, "clip_scale")
            assert_rel(delta * lr * scale, float(r["step_norm"]), what="delta_norm x lr x clip_scale")
        if clip is not None:
            assert all(float(r["clip_scale"]) < 1.0 for r in ups)  # clipping really happened


# -- eval: an every: policy's resets ------------------------------------------------------------------------

def test_eval_every_policy_resets_where_the_policy_says(tmp_path):
    book = tmp_path / "data" / "spk" / "book"
    book.mkdir(parents=True)
    shutil.copy(HELLO, book / "1.wav")
    shutil.copy(WEATHER, book / "2.flac")
    r = cli("eval", "librilight", tmp_path / "data", "--model", "tiny", "-p", "every:2s", "-p", "off",
            "--no-codes-cache", "--out", tmp_path / "out", "--telemetry", tmp_path / "t", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    T = res["documents"][0]["steps"]
    files = res["update_series"]["files"]
    assert files["every:2s"]["spk/book"]["csv"] == str(tmp_path / "t" / "every-2s" / "spk_book.updates.csv")
    rows = read_rows(files["every:2s"]["spk/book"]["csv"])
    resets_by_hand = list(range(25, T, 25))  # every 2 s = round(2 x 12.5) = 25 steps, inside the document
    for layer in ("1", "3"):
        mine = [r for r in rows if r["layer"] == layer]
        assert [int(r["step"]) for r in mine if r["event"] == "reset"] == resets_by_hand
        # chunk counting restarts at each reset: one update 16 steps after each, index 0 (0 < 16 < 25)
        ups = [r for r in mine if r["event"] == "update"]
        assert [int(r["step"]) for r in ups] == [s + 16 for s in [0] + resets_by_hand if s + 16 <= T]
        assert {r["update"] for r in ups} == {"0"}
        for r in mine:
            if r["event"] == "reset":
                assert [float(r[k]) for k in ("delta_norm", "step_norm", "drift", "w_norm")] == [0.0] * 4
    assert read_rows(files["off"]["spk/book"]["csv"]) == []  # frozen: nothing moves, no rows


# -- a non-finite update: a `nonfinite` row, then a reset to θ0 ----------------------------------------------

def _poison(layer) -> None:
    """Makes the stream's pending mini-batch non-finite (In-Place: a Z row; learner variants: the gradient sum)."""
    st = layer._streaming_state
    if hasattr(st, "pending_z"):
        st.pending_z[0, 2, 0] = math.nan
    else:
        s = next(iter(st.learners.values())).sums["W1"]
        s[(0,) * s.dim()] = math.inf


@pytest.mark.parametrize("preset", ["tiny", "tiny-mlp"])
def test_nonfinite_update_row_then_reset_to_theta0(preset, tiny):
    from ttt_cli import load_model, ttt_layers
    from ttt_cli.state import capture
    from ttt_cli.streaming import block_streaming
    from ttt_cli.telemetry import recording, take_rows

    m = tiny if preset == "tiny" else load_model(preset, device="cpu", dtype="fp32")
    lm = m.lm
    layers = ttt_layers(lm)
    first, C = min(layers), layers[min(layers)].chunk_size
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, min(lm.card, lm.text_card), (1, lm.num_codebooks, 3 * C), generator=g)
    with torch.no_grad(), recording(lm), block_streaming(lm, 1, C):
        lm.forward_text(codes[:, :, :C + 4])
        _poison(layers[first])
        with pytest.warns(UserWarning, match="non-finite"):
            lm.forward_text(codes[:, :, C + 4:2 * C])
            take = take_rows(lm, 0)
            for layer in layers.values():  # the learner variants warn when telemetry is read (SPEC §3.7)
                layer.telemetry(0)
        at_2c = capture(lm, 0).tensors
        lm.forward_text(codes[:, :, 2 * C:])
        after = capture(lm, 0).tensors
        rest = take_rows(lm, 0)
    # θ0 as the checkpoint file holds it, not as the layer reports it
    theta0 = {k: v for k, v in checkpoint_theta0(preset).items() if k.split(".")[1] == str(first)}
    assert theta0
    for k, v in theta0.items():
        assert torch.equal(at_2c[k].double(), v), f"{k} is not θ0 after the non-finite update"
    events = [(r.event, r.update, r.step) for r in take[first]]
    assert events == [("update", 0, C), ("nonfinite", 1, 2 * C), ("reset", 0, 2 * C)]
    if preset == "tiny":  # In-Place reads W, not the poisoned chunk: the other layer is untouched (a poisoned
        assert all(r.event == "update" for r in take[max(layers)])  # learner sum also poisons the outputs)
    nxt = rest[first]  # steps count from the previous take (a file boundary), the index from the reset
    assert [(r.event, r.update, r.step) for r in nxt] == [("update", 0, C)]
    names = list(theta0)
    assert_rel(nxt[0].drift, norm(after[n].double() - theta0[n].double() for n in names) / norm(
        theta0[n] for n in names), what="drift after the reset")


# -- infer: one file per stream, the same rows in a batch as alone ---------------------------------------------

def test_infer_batch_streams_each_get_their_own_file(tmp_path):
    base = ["--model", "tiny", "--greedy", "--mode", "transcribe"]  # no audio decoding: faster
    r = cli("infer", HELLO, WEATHER, "-b", "2", "--out", tmp_path / "o", "--telemetry", tmp_path / "t", *base,
            "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert [x["outputs"]["updates_csv"] for x in res] == [str(tmp_path / "t" / f"{s}.updates.csv")
                                                          for s in ("hello", "weather")]
    alone = cli("infer", WEATHER, "--out", tmp_path / "o1", "--telemetry", tmp_path / "t1", *base)
    assert alone.exit_code == 0, alone.output
    batch, single = read_rows(tmp_path / "t" / "weather.updates.csv"), read_rows(tmp_path / "t1" / "weather.updates.csv")
    assert len(batch) == len(single) > 0
    assert {r["stream"] for r in batch} == {"1"} and {r["stream"] for r in single} == {"0"}
    for a, b in zip(batch, single):
        assert [a[k] for k in ("event", "layer", "update", "step", "tokens")] == \
            [b[k] for k in ("event", "layer", "update", "step", "tokens")]
        for k in ("step_norm", "drift", "w_norm"):
            assert_rel(float(a[k]), float(b[k]), 1e-4, k)
    # the output guard: ours needs --overwrite, a foreign file is never replaced (before the model loads)
    again = cli("infer", WEATHER, "--out", tmp_path / "o1", "--telemetry", tmp_path / "t1", *base)
    assert again.exit_code == 2 and "--overwrite" in again.output
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "weather.updates.csv").write_text("mine\n")
    foreign = cli("infer", WEATHER, "--out", tmp_path / "o2", "--telemetry", tmp_path / "t2", *base, "--overwrite")
    assert foreign.exit_code == 2 and "not written by ttt" in foreign.output
    assert (tmp_path / "t2" / "weather.updates.csv").read_text() == "mine\n"
