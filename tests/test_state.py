"""Fast-weight state: exact resume, flush-partial by the equations, fit checks, files, and the CLI."""

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

from ttt_cli import load_model, ttt_layers
from ttt_cli.codes import transformer_input
from ttt_cli.errors import ConfigError, StateMismatchError
from ttt_cli.export import export_states
from ttt_cli.fastweights.interface import FastWeightLayer
from ttt_cli.models.presets import preset_dir
from ttt_cli.state import (capture, check_fits, diff_states, fingerprint, inspect_state, load_state, restore,
                           save_state)
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


def random_codes(lm, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    return codes


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


# -- flush-partial by the equations ---------------------------------------------------------------

def naive_delta(z, x0, conv_w, w_target):
    """Δ = V̂ᵀ Z of one (partial) chunk: V̂_t = W_target · Σ_j conv[:, :, j] · X0_{t+j}, zero-padded inside it."""
    n, K = x0.shape[0], conv_w.shape[-1]
    v = torch.zeros(n, x0.shape[1], dtype=torch.float64)
    for t in range(n):
        acc = torch.zeros(x0.shape[1], dtype=torch.float64)
        for j in range(K):
            if t + j < n:
                acc += conv_w[:, :, j] @ x0[t + j]
        v[t] = w_target @ acc
    return v, v.T @ z


def test_flush_partial_equals_the_update_equations(tiny, fresh, clip, tmp_path):
    at = 1.5  # round(1.5 x 12.5) = 19 steps: one full chunk, 3 tokens pending
    plain = export_states(tiny, [clip], tmp_path / "plain", at=[at])
    flushed = export_states(tiny, [clip], tmp_path / "flushed", at=[at], flush_partial=True)
    assert [s.steps for s in plain.items[0].snapshots][0] == 19
    ttt = load_file(str(preset_dir("tiny") / "ttt.safetensors"))
    lr = tiny.ttt.lr
    # Each flushed snapshot (at 1.5 s and at the end) = the unflushed one + lr·V̂ᵀZ of its pending rows; for the
    # end one this also shows that the stream went on unflushed after the 1.5 s snapshot.
    for sa, sf in zip(plain.items[0].snapshots, flushed.items[0].snapshots):
        a, f = load_state(sa.path), load_state(sf.path)
        assert a.meta["steps"] == f.meta["steps"] and f.meta["flushed"] and not a.meta["flushed"]
        for i in a.layers:
            pre = f"transformer.layers.{i}.gating.target_generator."
            conv_w, w_t = ttt[pre + "conv1d.conv.weight"].double(), ttt[pre + "W_target.weight"].double()
            t = a.layer_tensors(i)
            z, x0 = t["pending_z"].double(), t["pending_x0"].double()
            assert z.shape[0] == a.meta["steps"] % CHUNK and z.shape[0] > 1
            v, delta = naive_delta(z, x0, conv_w, w_t)
            # ntp on tiny: the target of row t is X0_{t+1} inside the chunk, 0 on its last row
            assert torch.allclose(v[:-1], x0[1:], atol=1e-6) and not v[-1].any()
            expect = t["w"].double() + lr * delta
            got = f.layer_tensors(i)
            assert (got["w"].double() - expect).norm() <= 1e-5 * expect.norm()
            assert (got["w"].double() - t["w"].double()).norm() > 1e-3 * expect.norm()
            assert got["pending_z"].shape[0] == 0 and f.pending_tokens(i) == 0
    assert a.meta["label"] == "end"
    f = load_state(flushed.items[0].snapshots[0].path)
    # chunk counting restarts after the flush: the next update comes after a full chunk
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


def test_export_matches_a_naive_step_loop(tiny, fresh, clip, tmp_path):
    """export-state's token layout and streaming against a hand-built sequence fed one step at a time."""
    res = export_states(tiny, [clip], tmp_path / "s.safetensors")
    assert res.layout == "file" and res.items[0].ok
    s = load_state(tmp_path / "s.safetensors")
    lm = fresh.lm
    wav, _ = sphn.read(str(clip), sample_rate=24000)
    wav = wav.mean(0).astype(np.float32)
    T = wav.shape[0] // 1920
    with torch.no_grad():
        audio = fresh.mimi.encode(torch.from_numpy(wav[:T * 1920])[None, None])[0]  # [8, T] in one call
    K = lm.num_codebooks
    seq = torch.empty(1, K, T, dtype=torch.long)
    for k in range(K):
        d = lm.delays[k]
        first = lm.text_initial_token_id if k == 0 else lm.initial_token_id
        for p in range(T):
            step = p - 1 - d  # position p holds codebook k of step p-1-delay (the initial token before that)
            if p == 0 or step < 0:
                seq[0, k, p] = first
            elif 1 <= k <= lm.dep_q:
                seq[0, k, p] = audio[k - 1, step]
            else:
                seq[0, k, p] = lm.zero_token_id  # text and the user stream: "no token"
    assert s.meta["steps"] == T == res.items[0].steps
    with torch.no_grad(), lm.streaming(1):
        for p in range(T):
            lm.forward_text(seq[:, :, p:p + 1])
        ref = layer_tensors(lm, 0)
    for i in s.layers:
        got = s.layer_tensors(i)
        assert got["pending_z"].shape[0] == ref[i]["pending_z"].shape[0] == T % CHUNK
        assert (got["w"] - ref[i]["w"]).norm() <= 1e-4 * ref[i]["w"].norm()


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


def test_metadata_and_fingerprint(tiny, fresh, snap):
    s = load_state(snap)
    m = s.meta
    for k in ("format_version", "variant", "layers", "chunk_size", "lr", "conv_kernel_size", "conv_padding",
              "target_source", "model_fingerprint", "steps", "seconds", "source_files", "reset_policy", "created",
              "tool_version"):
        assert k in m, k
    assert m["layers"] == [1, 3] and m["chunk_size"] == 16 and m["steps"] == 24 and m["source_files"] == ["x.wav"]
    assert m["pending_tokens"] == {"1": 8, "3": 8} and s.tensors["layers.3.pending_x0"].shape == (8, 64)
    # the fingerprint is sha256 over W0 and the target generator's bytes and the structural TTT config
    # (SPEC §3.9: not lr or clip), by hand
    import hashlib
    import json
    h = hashlib.sha256()
    for i, layer in sorted(ttt_layers(fresh.lm).items()):
        h.update(f"layer:{i};".encode())
        tg = layer.target_generator
        for name, t in (("target_generator.W_target.weight", tg.W_target.weight),
                        ("target_generator.conv1d.conv.weight", tg.conv1d.conv.weight), ("w_down", layer.w_down)):
            h.update(f"{name}:{list(t.shape)};".encode())
            h.update(t.detach().numpy().tobytes())
        h.update(json.dumps({"variant": "inplace", "chunk_size": 16, "conv_kernel_size": 2, "conv_padding": "right",
                             "target_source": "input"}, sort_keys=True, separators=(",", ":")).encode())
    h.update(json.dumps({"layers": [1, 3]}).encode())
    assert fingerprint(fresh) == fingerprint(tiny.lm) == m["model_fingerprint"] == h.hexdigest()
    assert check_fits(fresh, s).fits
    with pytest.raises(ConfigError, match="overwrite"):
        save_state(s, snap)


def test_snapshots_that_do_not_fit_are_refused(tiny, tiny_stt, snap):
    s = load_state(snap)
    cases = [({"chunk_size": 8}, "config", "chunk_size", False), ({"layers": "0,1"}, "layers", "layer set", False),
             ({"target_source": "text"}, "config", "target_source", False),
             ({"lr": 0.1}, "hyper", "lr differs", True)]
    for overrides, kind, text, forceable in cases:
        m = load_model("tiny", device="cpu", dtype="fp32", ttt=overrides)
        rep = check_fits(m, s)
        assert not rep.fits and kind in [p.kind for p in rep.problems] and text in rep.reason()
        assert rep.forceable == forceable
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
    # another model of the same shapes (tiny-stt): W0 differs -> refused, restorable with force
    rep = check_fits(tiny_stt, s)
    assert [p.kind for p in rep.problems] == ["w0"] and rep.forceable and "W0" in rep.reason()
    with torch.no_grad(), tiny_stt.lm.streaming(1):
        with pytest.raises(StateMismatchError, match="W0"):
            restore(tiny_stt.lm, s, 0)
        restore(tiny_stt.lm, s, 0, force=True)
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


def test_inspect_and_diff_library(tiny, snap):
    s = load_state(snap)
    res = inspect_state(s, tiny)
    assert res.fit.fits and [r.layer for r in res.layers] == [1, 3]
    for r in res.layers:
        w, w0 = s.layer_tensors(r.layer)["w"].double(), ttt_layers(tiny.lm)[r.layer].w_down.double()
        assert abs(r.w_norm - w.norm().item()) <= 1e-9 * w.norm().item()
        assert abs(r.delta_norm - (w - w0).norm().item()) <= 1e-5 * (w - w0).norm().item()
        assert r.pending_tokens == 8 and r.drift_against == "model"
        rec = inspect_state(s).layers[[1, 3].index(r.layer)]
        assert rec.drift_against == "recorded" and abs(rec.relative_drift - r.relative_drift) <= 1e-6
    d = diff_states(s, s)
    assert d.identical and all(r.diff_norm == 0 for r in d.layers) and not d.meta_differs


# -- CLI ------------------------------------------------------------------------------------------

def run(args):
    from ttt_cli.cli.app import app
    return CliRunner().invoke(app, args)


def test_cli_export_inspect_diff(clip, tmp_path):
    out = tmp_path / "states"
    r = run(["export-state", str(clip), "--model", "tiny", "--out", str(out), "--at", "1.5", "--at", "3s", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    snaps = res["items"][0]["snapshots"]
    stem = clip.stem
    assert [Path(x["path"]).name for x in snaps] == [f"{stem}.at-1.5s.safetensors", f"{stem}.at-3s.safetensors",
                                                     f"{stem}.end.safetensors"]
    steps = [19, 38, res["items"][0]["steps"]]  # round(1.5 x 12.5) = 19, round(3 x 12.5) = 38 (half to even)
    assert [x["steps"] for x in snaps] == steps and all(x["verified"] for x in snaps)
    assert [x["pending_tokens"]["1"] for x in snaps] == [s % CHUNK for s in steps]
    end = out / f"{stem}.end.safetensors"
    r = run(["inspect-state", str(end), "--model", "tiny", "--json"])
    assert r.exit_code == 0, r.output
    ins = json.loads(r.stdout)
    assert ins["fit"]["fits"] and [l["pending_tokens"] for l in ins["layers"]] == [steps[2] % CHUNK] * 2
    assert ins["meta"]["source_files"] == [str(clip)] and ins["meta"]["reset_policy"] == "file"
    r = run(["inspect-state", str(end)])  # tables go to stderr, nothing on stdout
    assert r.exit_code == 0 and r.stdout == "" and "pending" in r.stderr
    a = out / f"{stem}.at-1.5s.safetensors"
    r = run(["diff-state", str(a), str(end), "--json"])
    assert r.exit_code == 0, r.output
    diff = json.loads(r.stdout)
    wa, wb = load_file(str(a))["layers.1.w"], load_file(str(end))["layers.1.w"]
    row = diff["layers"][0]
    assert not diff["identical"] and diff["same_fingerprint"] and row["layer"] == 1
    assert abs(row["diff_norm"] - (wa.double() - wb.double()).norm().item()) <= 1e-6 * row["diff_norm"]
    assert diff["meta_differs"]["steps"] == [19, steps[2]]
    # the same command again: refused, nothing overwritten
    before = end.read_bytes()
    r = run(["export-state", str(clip), "--model", "tiny", "--out", str(out), "--at", "1.5", "--at", "3s"])
    assert r.exit_code == 2 and "--overwrite" in r.stderr and end.read_bytes() == before
    # inspect against a model it does not fit: report, then exit 2 with the reason
    r = run(["inspect-state", str(end), "--model", "tiny", "--ttt-chunk-size", "8"])
    assert r.exit_code == 2 and "chunk_size differs" in r.stderr and "Traceback" not in r.output
    # an --init-state that does not fit: exit 2 before anything is written
    r = run(["export-state", str(clip), "--model", "tiny", "--ttt-layers", "0,2", "--init-state", str(end),
             "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "layer set differs" in r.stderr and not (tmp_path / "x.safetensors").exists()
    # a broken snapshot file: one paragraph, exit 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(before[: len(before) // 3])
    for args in (["inspect-state", str(bad)], ["diff-state", str(bad), str(end)]):
        r = run(args)
        assert r.exit_code == 2 and "cannot read as safetensors" in r.stderr and "Traceback" not in r.output


def test_cli_bad_audio_is_skipped_and_init_state_resumes(clip, tmp_path):
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
    # --init-state: the second pass starts from the first pass's end state, so its weights differ from a cold run
    r = run(["export-state", str(short), "--model", "tiny", "--init-state", str(out / "first.end.safetensors"),
             "--out", str(tmp_path / "warm.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    warm = load_state(tmp_path / "warm.safetensors")
    cold = load_state(out / "first.end.safetensors")
    assert warm.meta["init_state"].endswith("first.end.safetensors")
    assert not torch.equal(warm.tensors["layers.1.w"], cold.tensors["layers.1.w"])
