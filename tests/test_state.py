"""Fast-weight state: exact resume, export against the naive per-token loop, flush-partial by the equations,
the fingerprint by behaviour, fit checks, files, diff, and the CLI."""

import contextlib
import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from naive_ttt import checkpoint_ttt, naive_delta, naive_ttt
from streaming_checks import random_codes
from ttt_cli import load_model, ttt_layers
from ttt_cli.codes import transformer_input
from ttt_cli.errors import ConfigError, StateMismatchError
from ttt_cli.fastweights.attach import set_ttt_lr
from ttt_cli.fastweights.interface import FastWeightLayer
from ttt_cli.models.presets import preset_dir
from ttt_cli.state import (FastWeightState, capture, check_fits, diff_states, fingerprint, inspect_state, load_state,
                           restore, save_state, w0_fingerprint)
from ttt_cli.streaming import block_streaming

ROOT = Path(__file__).resolve().parents[1]
T_TOTAL, BLOCK = 56, 8   # tiny: context 32, chunk 16 -> the attention window wraps, 3 chunks complete
CHUNK = 16


@pytest.fixture(scope="module")
def fresh():
    """A second, independently loaded tiny model: resuming happens in another model object."""
    return load_model("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A short speech clip: the bundled example when there is one, else synthesized with espeak-ng."""
    bundled = ROOT / "examples" / "hello.wav"
    if bundled.exists():
        return bundled
    out = tmp_path_factory.mktemp("audio") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(out), "Hello, this is a short test of the fast weight state."],
                   check=True, capture_output=True)
    return out


def feed(lm, seq, a, b):
    """forward_text over positions [a, b) in blocks of BLOCK; returns (transformer out, text logits)."""
    outs, texts = [], []
    for p in range(a, b, BLOCK):
        o, t = lm.forward_text(seq[:, :, p:min(b, p + BLOCK)])
        outs.append(o)
        texts.append(t)
    return torch.cat(outs, 1), torch.cat(texts, 2)


def reset_attention_only(lm, B):
    """Test-side reference for a cut: reset every streaming module's state except the fast-weight layers."""
    from moshi.modules.streaming import StreamingModule
    mask = torch.ones(B, dtype=torch.bool)
    n = 0
    for mod in lm.modules():
        if isinstance(mod, StreamingModule) and not isinstance(mod, FastWeightLayer) and mod._streaming_state is not None:
            mod._streaming_state.reset(mask)
            n += 1
    assert n > 4


def layer_tensors(lm, b):
    return {i: layer.capture(b) for i, layer in ttt_layers(lm).items()}


# -- exact resume ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [21, 32], ids=["inside-chunk", "chunk-boundary"])
@pytest.mark.parametrize("attention", [True, False], ids=["with-attention", "fast-weights-only"])
def test_exact_resume_in_a_fresh_model(tiny, fresh, tmp_path, t, attention):
    B = 2
    seq = transformer_input(tiny.lm, random_codes(tiny.lm, B, T_TOTAL, seed=t))  # [B, K, T]
    with torch.no_grad(), block_streaming(tiny.lm, B, BLOCK):
        feed(tiny.lm, seq, 0, t)
        snaps = [capture(tiny.lm, b, attention=attention) for b in range(B)]
        for b in range(B):
            save_state(snaps[b], tmp_path / f"s{b}.safetensors", metadata={"steps": t})
        if not attention:
            reset_attention_only(tiny.lm, B)
        ref_out, ref_text = feed(tiny.lm, seq, t, T_TOTAL)
        ref_fw = [layer_tensors(tiny.lm, b) for b in range(B)]
    loaded = [load_state(tmp_path / f"s{b}.safetensors") for b in range(B)]
    assert fresh.lm is not tiny.lm and loaded[0].meta["steps"] == t
    assert all(s.pending_tokens(1) == t % CHUNK for s in loaded)
    # Same slots: bit-exact continuation. Swapped slots (batch items are independent): equal up to
    # the last bits a multi-threaded matmul may change when a row moves within the batch.
    for swap in (False, True):
        order = [B - 1 - b for b in range(B)] if swap else list(range(B))
        with torch.no_grad(), block_streaming(fresh.lm, B, BLOCK):
            for b in range(B):
                restore(fresh.lm, loaded[order[b]], batch_index=b)
            out, text = feed(fresh.lm, seq[order], t, T_TOTAL)
            fw = [layer_tensors(fresh.lm, b) for b in range(B)]
        same = (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5)) if swap else torch.equal
        for b in range(B):
            r = order[b]
            assert same(out[b], ref_out[r]) and same(text[b], ref_text[r]), (swap, b)
            for i in ref_fw[r]:
                for name in ("w", "pending_z", "pending_x0"):
                    assert same(fw[b][i][name], ref_fw[r][i][name]), (swap, b, i, name)
    # The run after the cut really depends on what was restored (not a vacuous comparison).
    with torch.no_grad(), block_streaming(fresh.lm, B, BLOCK):
        cold_out, _ = feed(fresh.lm, seq, t, T_TOTAL)
    assert (cold_out - ref_out).abs().max() > 1e-2


def test_attention_restore_into_other_cache_capacity(tiny, fresh):
    """A snapshot is capacity-independent: restoring into one-step streaming (cache = context) continues the same."""
    seq = transformer_input(tiny.lm, random_codes(tiny.lm, 1, 48, seed=5))
    with torch.no_grad(), block_streaming(tiny.lm, 1, BLOCK):
        feed(tiny.lm, seq, 0, 40)
        s = capture(tiny.lm, 0, attention=True)
        ref, _ = feed(tiny.lm, seq, 40, 48)
    with torch.no_grad(), fresh.lm.streaming(1):
        restore(fresh.lm, s, 0)
        got = torch.cat([fresh.lm.forward_text(seq[:, :, p:p + 1])[0] for p in range(40, 48)], 1)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_capture_and_restore_need_streaming(tiny):
    with pytest.raises(StateMismatchError, match="not streaming"):
        capture(tiny.lm, 0)


# -- export against the naive per-token loop ---------------------------------------------------------

@pytest.fixture(scope="module")
def plain():
    """Plain moshi modules (no TTT layers attached): the naive references run on it."""
    return load_model("tiny", device="cpu", dtype="fp32", ttt=False)


@pytest.fixture(scope="module")
def clip2(clip, tmp_path_factory):
    """The first 2.5 s of the clip, as another input."""
    wav, sr = sphn.read(str(clip))
    out = tmp_path_factory.mktemp("audio") / "part.wav"
    sphn.write_wav(str(out), wav[:, : int(2.5 * sr)], sr)
    return out


def hand_sequence(lm, mimi, path):
    """export-state's teacher-forced LM input [1, K, T], built here: audio on Moshi's stream, text and the
    user stream -1, position p holding step p-1-delay_k of codebook k (the initial token before that)."""
    wav, _ = sphn.read(str(path), sample_rate=24000)
    wav = wav.mean(0).astype(np.float32)
    T = wav.shape[0] // 1920
    with torch.no_grad():
        audio = mimi.encode(torch.from_numpy(wav[:T * 1920])[None, None])[0]  # [8, T] in one call
    K = lm.num_codebooks
    seq = torch.empty(1, K, T, dtype=torch.long)
    for k in range(K):
        d = lm.delays[k]
        first = lm.text_initial_token_id if k == 0 else lm.initial_token_id
        for p in range(T):
            step = p - 1 - d
            if p == 0 or step < 0:
                seq[0, k, p] = first
            elif 1 <= k <= lm.dep_q:
                seq[0, k, p] = audio[k - 1, step]
            else:
                seq[0, k, p] = lm.zero_token_id  # text and the user stream: "no token"
    return seq


_NAIVE: dict = {}


def naive_stream(plain, path, init_key=None):
    """{layer: NaiveStream} after feeding `path`'s hand-built sequence one position at a time through plain
    moshi with the naive fast-weight loop (tests/naive_ttt.py), started from W0 or from the end state of
    `naive_stream(plain, init_key)` (W and pending rows). Computed once per arguments."""
    key = (str(path), init_key and str(init_key))
    if key not in _NAIVE:
        init = naive_stream(plain, init_key) if init_key else None
        seq = hand_sequence(plain.lm, plain.mimi, path)
        with torch.no_grad(), naive_ttt(plain.lm, *checkpoint_ttt(preset_dir("tiny"))) as streams, \
                plain.lm.streaming(1):
            for i, st in streams.items():
                st.start(init[i].w, init[i].zs, init[i].xs) if init else st.start()
            for p in range(seq.shape[-1]):
                plain.lm.forward_text(seq[:, :, p:p + 1])
        _NAIVE[key] = {i: copy.deepcopy(st) for i, st in streams.items()}
    return _NAIVE[key]


def assert_snapshot_is(path, streams, rel=1e-4):
    """A snapshot file (read with safetensors) holds the naive stream's W and pending rows."""
    t = load_file(str(path))
    for i, st in streams.items():
        w = t[f"layers.{i}.w"].double()
        assert (w - st.w).norm() <= rel * st.w.norm(), i
        assert t[f"layers.{i}.pending_z"].shape[0] == len(st.zs)
        for name, rows in (("pending_z", st.zs), ("pending_x0", st.xs)):
            if rows:
                got, want = t[f"layers.{i}.{name}"].double(), torch.stack(rows)
                assert (got - want).norm() <= rel * want.norm(), (i, name, ((got - want).norm() / want.norm()).item())


def test_export_and_init_state_equal_the_naive_loop(plain, clip, clip2, tmp_path):
    """export-state's snapshot = the naive loop over the hand-built sequence; with --init-state the next
    input continues from W and the pending chunk (15 tokens), as the naive loop does."""
    r = run(["export-state", str(clip), "--model", "tiny", "--out", str(tmp_path / "a.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    first = naive_stream(plain, clip)
    assert len(first[1].zs) == 63 % CHUNK == 15 and first[1].updates == 3
    assert_snapshot_is(tmp_path / "a.safetensors", first)
    r = run(["export-state", str(clip2), "--model", "tiny", "--init-state", str(tmp_path / "a.safetensors"),
             "--out", str(tmp_path / "warm.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    warm = naive_stream(plain, clip2, init_key=clip)
    assert_snapshot_is(tmp_path / "warm.safetensors", warm)
    cold = naive_stream(plain, clip2)
    assert (warm[1].w - cold[1].w).norm() > 1e-2 * cold[1].w.norm()  # the warm start matters
    s = load_state(tmp_path / "warm.safetensors")
    assert s.meta["init_state"].endswith("a.safetensors") and s.meta["steps"] == 31


# -- the CLI: export, --at, --flush-partial, inspect, diff ----------------------------------------------

def run(args):
    from ttt_cli.cli.app import app
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def exported(clip, tmp_path_factory):
    """`export-state` with --at 1.5 / 3s / 1m (past the end), pending chunks kept, and the same flushed."""
    out = tmp_path_factory.mktemp("export")
    runs = {}
    for name, extra in (("plain", []), ("flushed", ["--flush-partial"])):
        r = run(["export-state", str(clip), "--model", "tiny", "--out", str(out / name), "--at", "1.5", "--at", "3s",
                 "--at", "1m", "--json", *extra])
        assert r.exit_code == 0, r.output
        runs[name] = (out / name, json.loads(r.stdout), r)
    return runs


def test_cli_export_at_times(clip, exported, plain):
    out, res, r = exported["plain"]
    item = res["items"][0]
    snaps = item["snapshots"]
    stem = clip.stem
    assert [Path(x["path"]).name for x in snaps] == [f"{stem}.at-1.5s.safetensors", f"{stem}.at-3s.safetensors",
                                                     f"{stem}.end.safetensors"]
    steps = [19, 38, 63]  # round(1.5 x 12.5) = 19, round(3 x 12.5) = 38 (half to even), 63 whole frames
    assert [x["steps"] for x in snaps] == steps and item["steps"] == 63
    assert [x["pending_tokens"]["1"] for x in snaps] == [s % CHUNK for s in steps]
    # --at past the end: said, and no snapshot for it (the run still succeeds)
    assert any("--at 60s (step 750) is past the end" in n for n in item["notes"])
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(x["path"]).name for x in snaps)
    assert_snapshot_is(out / f"{stem}.end.safetensors", naive_stream(plain, clip))
    # the same command again: refused, nothing overwritten
    before = (out / f"{stem}.end.safetensors").read_bytes()
    r = run(["export-state", str(clip), "--model", "tiny", "--out", str(out), "--at", "1.5", "--at", "3s"])
    assert r.exit_code == 2 and "--overwrite" in r.stderr and (out / f"{stem}.end.safetensors").read_bytes() == before


def test_cli_flush_partial_equals_the_update_equations(exported, fresh):
    """--flush-partial: each snapshot = the unflushed one + lr·V̂ᵀZ of its pending rows (Δ by hand, V̂ from
    the checkpoint's own conv and W_target), and the stream itself went on unflushed."""
    cfg, ttt = checkpoint_ttt(preset_dir("tiny"))
    (_, plain_res, _), (_, flushed_res, _) = exported["plain"], exported["flushed"]
    pairs = list(zip(plain_res["items"][0]["snapshots"], flushed_res["items"][0]["snapshots"]))
    assert len(pairs) == 3
    for sa, sf in pairs:
        a, f = load_state(sa["path"]), load_state(sf["path"])
        assert a.meta["steps"] == f.meta["steps"] and f.meta["flushed"] and not a.meta["flushed"]
        for i in a.layers:
            pre = f"transformer.layers.{i}.gating.target_generator."
            t = a.layer_tensors(i)
            z, x0 = t["pending_z"].double(), t["pending_x0"].double()
            assert z.shape[0] == a.meta["steps"] % CHUNK and z.shape[0] > 1
            delta = naive_delta(z, x0, ttt[pre + "conv1d.conv.weight"], ttt[pre + "W_target.weight"], "right")
            expect = t["w"].double() + cfg["lr"] * delta
            got = f.layer_tensors(i)
            assert (got["w"].double() - expect).norm() <= 1e-5 * expect.norm()
            assert (got["w"].double() - t["w"].double()).norm() > 1e-3 * expect.norm()
            assert got["pending_z"].shape[0] == 0 and f.pending_tokens(i) == 0
    # chunk counting restarts after the flush: the next update comes after a full chunk
    f = load_state(pairs[0][1]["path"])
    seq = transformer_input(fresh.lm, random_codes(fresh.lm, 1, 20, seed=3))
    with torch.no_grad(), fresh.lm.streaming(1):
        restore(fresh.lm, f, 0)
        for p in range(CHUNK - 1):
            fresh.lm.forward_text(seq[:, :, p:p + 1])
        layer = ttt_layers(fresh.lm)[1]
        assert layer.capture(0)["pending_z"].shape[0] == CHUNK - 1
        assert torch.equal(layer.capture(0)["w"], f.layer_tensors(1)["w"])
        fresh.lm.forward_text(seq[:, :, CHUNK - 1:CHUNK])
        assert layer.capture(0)["pending_z"].shape[0] == 0
        assert not torch.equal(layer.capture(0)["w"], f.layer_tensors(1)["w"])


def test_cli_inspect_and_diff(clip, exported, tmp_path):
    out, res, _ = exported["plain"]
    stem = clip.stem
    end, a = out / f"{stem}.end.safetensors", out / f"{stem}.at-1.5s.safetensors"
    r = run(["inspect-state", str(end), "--model", "tiny", "--json"])
    assert r.exit_code == 0, r.output
    ins = json.loads(r.stdout)
    assert ins["fit"]["fits"] and [l["pending_tokens"] for l in ins["layers"]] == [63 % CHUNK] * 2
    assert ins["meta"]["source_files"] == [str(clip)] and ins["meta"]["reset_policy"] == "file"
    w0 = checkpoint_ttt(preset_dir("tiny"))[1]
    for row in ins["layers"]:
        w = load_file(str(end))[f"layers.{row['layer']}.w"].double()
        w0_i = w0[f"transformer.layers.{row['layer']}.gating.w_down"].double()
        assert row["delta_norm"] == pytest.approx((w - w0_i).norm().item(), rel=1e-5)
        assert row["relative_drift"] == pytest.approx(((w - w0_i).norm() / w0_i.norm()).item(), rel=1e-5)
    r = run(["inspect-state", str(end)])  # tables go to stderr, nothing on stdout
    assert r.exit_code == 0 and r.stdout == "" and "pending" in r.stderr
    r = run(["diff-state", str(a), str(end), "--json"])
    assert r.exit_code == 0, r.output
    diff = json.loads(r.stdout)
    wa, wb = load_file(str(a)), load_file(str(end))
    assert not diff["identical"] and diff["same_fingerprint"]
    for row in diff["layers"]:
        d = wa[f"layers.{row['layer']}.w"].double() - wb[f"layers.{row['layer']}.w"].double()
        assert row["diff_norm"] == pytest.approx(d.norm().item(), rel=1e-6)
        assert row["max_abs_diff"] == pytest.approx(d.abs().max().item(), rel=1e-6)
        assert (row["pending_a"], row["pending_b"]) == (19 % CHUNK, 63 % CHUNK)
    assert diff["meta_differs"]["steps"] == [19, 63]
    # inspect against a model it does not fit: report, then exit 2 with the reason
    r = run(["inspect-state", str(end), "--model", "tiny", "--ttt-chunk-size", "8"])
    assert r.exit_code == 2 and "chunk_size differs" in r.stderr and "Traceback" not in r.output
    # an --init-state that does not fit: exit 2 before anything is written
    r = run(["export-state", str(clip), "--model", "tiny", "--ttt-layers", "0,2", "--init-state", str(end),
             "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "layer set differs" in r.stderr and not (tmp_path / "x.safetensors").exists()
    # a broken snapshot file: one paragraph, exit 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(end.read_bytes()[: end.stat().st_size // 3])
    for args in (["inspect-state", str(bad)], ["diff-state", str(bad), str(end)]):
        r = run(args)
        assert r.exit_code == 2 and "cannot read as safetensors" in r.stderr and "Traceback" not in r.output


def test_written_snapshots_are_verified(clip, tmp_path, monkeypatch):
    """A snapshot that does not read back as written is refused and leaves no file (the check can fail)."""
    import safetensors.torch as st
    real = st.save_file

    def corrupt(tensors, path, metadata=None):
        t = dict(tensors)
        t["layers.1.w"] = t["layers.1.w"].clone()
        t["layers.1.w"][0, 0] += 1.0  # what a failing disk might do
        real(t, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", corrupt)
    r = run(["export-state", str(clip), "--model", "tiny", "--out", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 2 and "does not read back identically (layers.1.w)" in r.stderr, r.output
    assert not any(tmp_path.iterdir())


def test_cli_bad_audio_is_skipped(clip, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    short = tmp_path / "first.wav"
    shutil.copy(clip, short)
    out = tmp_path / "dir"
    r = run(["export-state", str(broken), str(short), "--model", "tiny", "--out", str(out), "--json"])
    assert r.exit_code == 1, r.output
    res = json.loads(r.stdout)
    assert [it["ok"] for it in res["items"]] == [False, True] and "cannot decode" in res["items"][0]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["first.end.safetensors"] and "broken.wav" in r.stderr


# -- the fingerprint, by behaviour ----------------------------------------------------------------

@contextlib.contextmanager
def changed(obj, attr, value):
    """Sets an attribute for the block (an instance attribute shadowing a class one is removed again)."""
    had, old = attr in obj.__dict__, obj.__dict__.get(attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)


@contextlib.contextmanager
def nudged(t):
    """Changes one entry of a tensor for the block, then puts the exact old value back."""
    flat = t.data.view(-1)
    old = flat[0].item()
    flat[0] += 0.5
    try:
        yield
    finally:
        flat[0] = old


def test_fingerprint_by_behaviour(tiny, fresh, tmp_path):
    """SPEC §3.9 / §5.3: the fingerprint changes with W0, the target tensors and every structural config key;
    not with lr, the clip, its epsilon or the ttt file's name."""
    base = fingerprint(fresh)
    assert base == fingerprint(tiny) and len(base) == 64  # two independent loads of one checkpoint agree
    layer = ttt_layers(fresh.lm)[3]
    tg = layer.target_generator
    changes = {}
    for name, t in (("W0", layer.w_down), ("conv", tg.conv1d.conv.weight), ("W_target", tg.W_target.weight)):
        with nudged(t):
            changes[name] = fingerprint(fresh)
    w0_before = w0_fingerprint(fresh)
    with nudged(tg.W_target.weight):
        assert w0_fingerprint(fresh) == w0_before  # the W0-only fingerprint is W0's alone
    structural = {"variant": (layer, "variant", "another"), "chunk_size": (layer, "chunk_size", 8),
                  "conv_kernel_size": (tg.conv1d, "kernel_size", 3), "conv_padding": (tg.conv1d, "padding", "center"),
                  "target_source": (layer, "target_source", "text"),
                  "activation": (layer, "activation_name", "gelu")}
    # every structural key the layer reports is covered here (a new one needs its case)
    assert set(layer.structural) & set(layer.config_section()) == set(structural)
    for key, (obj, attr, value) in structural.items():
        with changed(obj, attr, value):
            assert layer.config_section()[key] == value
            changes[key] = fingerprint(fresh)
    changes["layers"] = fingerprint(load_model("tiny", device="cpu", dtype="fp32", ttt={"layers": "1"}))
    assert base not in changes.values() and len(set(changes.values())) == len(changes), changes
    for attr, value in (("lr", 0.3), ("clip", 0.5), ("clip_eps", 1e-3)):
        with changed(layer, attr, value):
            assert fingerprint(fresh) == base, attr
    set_ttt_lr(fresh.lm, 0.0)  # what --no-ttt and the eval policy `off` do
    try:
        assert fingerprint(fresh) == base
    finally:
        set_ttt_lr(fresh.lm, fresh.ttt.lr)
    for ov in ({"lr": 0.2}, {"delta_clip_fro_norm": 1.0, "delta_clip_epsilon": 1e-6}):
        assert fingerprint(load_model("tiny", device="cpu", dtype="fp32", ttt=ov)) == base
    ck = tmp_path / "ck"  # the same checkpoint with its ttt file under another name
    shutil.copytree(preset_dir("tiny"), ck)
    (ck / "ttt.safetensors").rename(ck / "fast.safetensors")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["ttt"]["ttt_name"] = "fast.safetensors"
    (ck / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(load_model(str(ck), device="cpu", dtype="fp32")) == base


# -- fit checks and files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def snap(tiny, tmp_path_factory):
    seq = transformer_input(tiny.lm, random_codes(tiny.lm, 1, 24, seed=9))
    with torch.no_grad(), tiny.lm.streaming(1):
        tiny.lm.forward_text(seq)
        s = capture(tiny, 0)
    path = tmp_path_factory.mktemp("snap") / "s.safetensors"
    save_state(s, path, metadata={"source_files": ["x.wav"]})
    return path


def test_metadata(tiny, fresh, snap):
    s = load_state(snap)
    m = s.meta
    for k in ("format_version", "variant", "layers", "chunk_size", "lr", "conv_kernel_size", "conv_padding",
              "target_source", "model_fingerprint", "fingerprint_version", "steps", "seconds", "source_files",
              "reset_policy", "created", "tool_version"):
        assert k in m, k
    assert m["layers"] == [1, 3] and m["chunk_size"] == 16 and m["steps"] == 24 and m["source_files"] == ["x.wav"]
    assert m["pending_tokens"] == {"1": 8, "3": 8} and s.tensors["layers.3.pending_x0"].shape == (8, 64)
    assert m["model_fingerprint"] == fingerprint(fresh) and check_fits(fresh, s).fits
    with pytest.raises(ConfigError, match="overwrite"):
        save_state(s, snap)


def test_snapshots_that_do_not_fit_are_refused(tiny, tiny_stt, fresh, snap):
    s = load_state(snap)
    cases = [({"chunk_size": 8}, "config", "chunk_size", False), ({"layers": "0,1"}, "layers", "layer set", False),
             ({"target_source": "text"}, "config", "target_source", False),
             ({"lr": 0.1}, "hyper", "lr differs", True)]
    for overrides, kind, text, forceable in cases:
        m = load_model("tiny", device="cpu", dtype="fp32", ttt=overrides)
        rep = check_fits(m, s)
        assert not rep.fits and kind in [p.kind for p in rep.problems] and text in rep.reason()
        assert rep.forceable == forceable
        if kind == "hyper":  # another lr is no other model: the fingerprint is the same
            assert [p.kind for p in rep.problems] == ["hyper"] and rep.model_fingerprint == s.fingerprint
        with torch.no_grad(), m.lm.streaming(1):
            before = layer_tensors(m.lm, 0)
            with pytest.raises(StateMismatchError, match=text):
                restore(m.lm, s, 0)
            if not forceable:
                with pytest.raises(StateMismatchError, match="cannot be forced"):
                    restore(m.lm, s, 0, force=True)
            after = layer_tensors(m.lm, 0)
            assert all(torch.equal(before[i][k], after[i][k]) for i in before for k in before[i])  # untouched
            if forceable:
                restore(m.lm, s, 0, force=True)
                assert torch.equal(m.lm.transformer.layers[1].gating.capture(0)["w"], s.layer_tensors(1)["w"])
    # another model of the same shapes (tiny-stt): another W0, another fingerprint -> never forced (SPEC §7.1)
    rep = check_fits(tiny_stt, s)
    assert [p.kind for p in rep.problems] == ["w0"] and not rep.forceable and "W0" in rep.reason()
    with torch.no_grad(), tiny_stt.lm.streaming(1):
        with pytest.raises(StateMismatchError, match="cannot be forced"):
            restore(tiny_stt.lm, s, 0, force=True)
    # the same W0 but other target tensors: the fingerprint says so, never forced
    with nudged(ttt_layers(fresh.lm)[1].target_generator.W_target.weight):
        rep = check_fits(fresh, s)
    assert [p.kind for p in rep.problems] == ["fingerprint"] and not rep.forceable and "target" in rep.reason()
    # a snapshot of the older fingerprint recipe whose W0 and config match: refused, forceable
    old = FastWeightState(s.tensors, {k: v for k, v in s.meta.items() if k != "fingerprint_version"})
    rep = check_fits(fresh, old)
    assert [p.kind for p in rep.problems] == ["fingerprint"] and rep.forceable and "older ttt" in rep.reason()
    # no TTT layers at all
    plain = load_model("tiny", device="cpu", dtype="fp32", ttt=False)
    assert [p.kind for p in check_fits(plain, s).problems] == ["no-ttt"]


def test_broken_files_give_clear_errors(snap, tmp_path):
    good = snap.read_bytes()
    cases = {
        "corrupt.safetensors": (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
                                "cannot read as safetensors"),
        "truncated.safetensors": (good[: len(good) // 2], "cannot read as safetensors"),
        "empty.safetensors": (b"", "cannot read as safetensors"),
    }
    for name, (data, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(StateMismatchError, match=msg) as e:
            load_state(p)
        assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(StateMismatchError, match="not a fast-weight snapshot"):
        load_state(foreign)
    tensors = load_file(str(snap))
    header = json.loads(json.loads(good[8:8 + int.from_bytes(good[:8], "little")])["__metadata__"]["ttt_state"])
    bad_json = tmp_path / "badjson.safetensors"
    save_file(tensors, str(bad_json), metadata={"ttt_state": "{not json"})
    with pytest.raises(StateMismatchError, match="not valid JSON"):
        load_state(bad_json)
    nan = dict(tensors)
    nan["layers.1.w"] = nan["layers.1.w"].clone()
    nan["layers.1.w"][0, 0] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file(nan, str(p), metadata={"ttt_state": json.dumps(header)})
    with pytest.raises(StateMismatchError, match="NaN"):
        load_state(p)
    missing = {k: v for k, v in tensors.items() if not k.startswith("layers.3.")}
    p = tmp_path / "missing.safetensors"
    save_file(missing, str(p), metadata={"ttt_state": json.dumps(header)})
    with pytest.raises(StateMismatchError, match=r"no tensors for layer\(s\) \[3\]"):
        load_state(p)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"ttt_state": json.dumps({**header, "format_version": 99})})
    with pytest.raises(StateMismatchError, match="format version 99"):
        load_state(newer)
    with pytest.raises(ConfigError, match="no such snapshot"):
        load_state(tmp_path / "nope.safetensors")


def test_inspect_library(tiny, snap):
    s = load_state(snap)
    res = inspect_state(s, tiny)
    assert res.fit.fits and [r.layer for r in res.layers] == [1, 3]
    w0s = checkpoint_ttt(preset_dir("tiny"))[1]
    for r in res.layers:
        w, w0 = s.layer_tensors(r.layer)["w"].double(), w0s[f"transformer.layers.{r.layer}.gating.w_down"].double()
        assert abs(r.w_norm - w.norm().item()) <= 1e-9 * w.norm().item()
        assert abs(r.delta_norm - (w - w0).norm().item()) <= 1e-5 * (w - w0).norm().item()
        assert r.pending_tokens == 8 and r.drift_against == "model"
        rec = inspect_state(s).layers[[1, 3].index(r.layer)]
        assert rec.drift_against == "recorded" and abs(rec.relative_drift - r.relative_drift) <= 1e-6


def test_diff_states_against_hand_computation(tiny, snap):
    """Two different snapshots, the same one twice, and snapshots that differ only in their pending chunk."""
    a = load_state(snap)
    seq = transformer_input(tiny.lm, random_codes(tiny.lm, 1, 40, seed=4))
    with torch.no_grad(), tiny.lm.streaming(1):
        tiny.lm.forward_text(seq)
        b = capture(tiny, 0)
    d = diff_states(a, b)
    assert not d.identical and d.same_fingerprint and d.only_in_a == d.only_in_b == []
    assert d.meta_differs["steps"] == [24, 40]
    for row in d.layers:
        wa, wb = a.layer_tensors(row.layer)["w"].double(), b.layer_tensors(row.layer)["w"].double()
        assert row.diff_norm == pytest.approx((wa - wb).norm().item(), rel=1e-9)
        assert row.relative_diff == pytest.approx(((wa - wb).norm() / wa.norm()).item(), rel=1e-9)
        assert row.max_abs_diff == pytest.approx((wa - wb).abs().max().item(), rel=1e-6)  # float32 difference
        assert row.w_norm_b == pytest.approx(wb.norm().item(), rel=1e-9) and row.diff_norm > 0.1
        assert (row.pending_a, row.pending_b, row.comparable, row.identical) == (8, 8, True, False)
    same = diff_states(a, load_state(snap))  # another read of the same file
    assert same.identical and all(r.diff_norm == 0 and r.identical for r in same.layers) and not same.meta_differs
    pend = FastWeightState(dict(a.tensors), dict(a.meta))  # same W, another pending chunk
    pend.tensors["layers.3.pending_z"] = a.tensors["layers.3.pending_z"] + 1.0
    p = diff_states(a, pend)
    assert not p.identical and [r.identical for r in p.layers] == [True, False] and p.layers[1].diff_norm == 0
    one = FastWeightState({k: v for k, v in a.tensors.items() if k.startswith("layers.1.")}, {**a.meta, "layers": [1]})
    o = diff_states(a, one)
    assert o.only_in_a == [3] and [r.layer for r in o.layers] == [1] and not o.identical


def test_snapshot_written_before_the_activation_key_still_fits():
    """Snapshots of format 1 written before `activation` joined the section lack the key; their fingerprint
    already covered it, so a model with activation gelu (the fork's) takes them, and a changed layer does not."""
    m = load_model("tiny", device="cpu", dtype="fp32", ttt={"activation": "gelu"})
    with m.lm.streaming(1):
        s = capture(m.lm, 0)
    assert s.meta["activation"] == "gelu"
    old = copy.deepcopy(s)
    del old.meta["activation"]
    assert check_fits(m, old).fits
    other = load_model("tiny", device="cpu", dtype="fp32", ttt={"activation": "silu"})
    assert not check_fits(other, old).fits  # the fingerprint still tells the activations apart
