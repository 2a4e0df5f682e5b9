"""The `mlp` and `linear-adapter` variants inside moshi's LMModel and behind every command (tiny-mlp, tiny-adapter),
against plain moshi, SPEC §3.10's layer written by hand, full-sequence forwards and per-step loops."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moshi.modules.gating import ActivationGating

from evals.librilight.scoring import score_document
from evals.policies import policy_settings
from streaming_checks import full_equals_blocks, random_codes, rel
from test_variants import adapter_reference, mlp_reference
from ttt_cli import load_model, ttt_layers
from ttt_cli.codes import transformer_input
from ttt_cli.errors import CheckpointError, ConfigError
from ttt_cli.fastweights.attach import set_ttt_lr
from ttt_cli.models.presets import preset_dir
from ttt_cli.state import capture, check_fits, fingerprint, load_state, restore, save_state
from ttt_cli.streaming import block_streaming

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "hello.wav"
PRESETS = ["tiny-mlp", "tiny-adapter"]


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name, device="cpu", dtype="fp32") for name in PRESETS}


@pytest.fixture(scope="module")
def plain():
    return load_model("tiny", device="cpu", dtype="fp32", ttt=False)


def max_diff(a, b):
    """Max |a − b| of LMModel.forward logits (NaN where moshi masks, in both)."""
    assert torch.equal(a.isnan(), b.isnan())
    return (a - b).nan_to_num().abs().max().item()


def run(args):
    from ttt_cli.cli.app import app
    return CliRunner().invoke(app, args)


# -- the layer inside moshi ----------------------------------------------------------------------------

def test_hybrid_layer_is_attention_then_ttt_then_feed_forward(models):
    """SPEC §3.10 by hand with moshi's own sub-blocks: x += SA(norm1 x); x += tanh(α)·TTT(x); x += FF(norm2 x)."""
    lm = models["tiny-mlp"].lm
    layer = lm.transformer.layers[1]
    x = torch.randn(2, 11, lm.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x1 = x + layer.layer_scale_1(layer.self_attn(layer.norm1(x), layer.norm1(x), layer.norm1(x)))
        x2 = x1 + mlp_reference(layer.ttt, x1).float()
        ref = x2 + layer.layer_scale_2(ActivationGating.forward(layer.gating, layer.norm2(x2)))
        assert rel(layer(x), ref) < 1e-4


def test_adapters_change_what_gating_and_attention_compute(models):
    """Pitfall 11: moshi's gating calls F.linear on the weights; with adapters it must use them (by hand)."""
    lm = models["tiny-adapter"].lm
    layer = lm.transformer.layers[3]
    x = torch.randn(1, 9, lm.dim, generator=torch.Generator().manual_seed(1))
    g = layer.gating
    with torch.no_grad():
        hu = adapter_reference(g.linear_in, x).float().view(1, 9, 2, -1)
        z = g.activation(hu[..., 0, :]) * hu[..., 1, :]
        ref = adapter_reference(g.linear_out, z)
        assert rel(g(x), ref) < 1e-4
        base = ActivationGating.forward.__wrapped__(g, x) if hasattr(ActivationGating.forward, "__wrapped__") else \
            torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, g.linear_in.weight)
                                       .view(1, 9, 2, -1)[..., 0, :]) * torch.nn.functional.linear(
                                           x, g.linear_in.weight).view(1, 9, 2, -1)[..., 1, :], g.linear_out.weight)
        assert rel(g(x), base) > 1e-2  # the adapters are visible
        proj = layer.self_attn.in_projs[0]
        assert isinstance(proj, torch.nn.Linear) and rel(proj(x), adapter_reference(proj, x)) < 1e-4


@pytest.mark.parametrize("name", PRESETS)
def test_full_forward_equals_block_streaming_and_ttt_matters(models, name):
    m = models[name]
    lm, C = m.lm, m.ttt.chunk_size
    T = 3 * C + 5
    seq = transformer_input(lm, random_codes(lm, 1, T))
    full = full_equals_blocks(lm, seq, (1, 7, C))
    with torch.no_grad():
        set_ttt_lr(lm, 0.0)
        try:
            _, frozen = lm.forward_text(seq)
        finally:
            set_ttt_lr(lm, m.ttt.rate)
    assert (full - frozen).norm() / frozen.norm() >= 0.1  # SPEC §4.1: TTT changes text logits by >= 10%


@pytest.mark.parametrize("name", PRESETS)
def test_model_causality_batch_isolation_out_of_phase(models, name):
    m = models[name]
    lm, C = m.lm, m.ttt.chunk_size
    T = 2 * C + 3
    codes = random_codes(lm, 2, T, seed=1)
    with torch.no_grad():
        _, base = lm.forward_text(transformer_input(lm, codes))
        c2 = codes.clone()
        c2[:, :, C + 1:] = random_codes(lm, 2, T - C - 1, seed=5)
        _, out = lm.forward_text(transformer_input(lm, c2))
        assert torch.equal(out[:, :, :C + 2], base[:, :, :C + 2])
        _, alone = lm.forward_text(transformer_input(lm, codes[1:]))
        assert rel(alone, base[1:]) < 1e-5
        # item 1's fast weights reset mid-stream: out of phase; item 0 equals its own run
        seq = transformer_input(lm, codes)
        with block_streaming(lm, 2, 5):
            lm.forward_text(seq[:, :, :7])
            for layer in ttt_layers(lm).values():
                layer.reset_streaming(torch.tensor([False, True]))
            tail = lm.forward_text(seq[:, :, 7:12])[1]
        with block_streaming(lm, 1, 5):
            lm.forward_text(seq[:1, :, :7])
            alone_tail = lm.forward_text(seq[:1, :, 7:12])[1]
    assert rel(tail[:1], alone_tail) < 1e-5


@pytest.mark.parametrize("name", PRESETS)
def test_wo_zero_is_plain_moshi(name, plain):
    m = load_model(name, device="cpu", dtype="fp32")
    with torch.no_grad():
        for layer in ttt_layers(m.lm).values():
            for key, t in layer.fingerprint_tensors().items():
                if key.split(".")[-1] == "wo" or key.startswith("wo."):
                    t.zero_()
        codes = random_codes(m.lm, 1, 30, seed=2)
        a, b = m.lm.forward(codes), plain.lm.forward(codes)
    assert max_diff(a.logits, b.logits) <= 1e-5 and max_diff(a.text_logits, b.text_logits) <= 1e-5


# -- snapshots -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_snapshot_file_resume_is_exact_and_other_variants_are_refused(models, name, tmp_path):
    m = models[name]
    lm = m.lm
    T, cut = 30, 13  # the cut falls inside a mini-batch of 8
    seq = transformer_input(lm, random_codes(lm, 1, T, seed=3))
    with torch.no_grad():
        with block_streaming(lm, 1, 8):
            lm.forward_text(seq[:, :, :cut])
            snap = capture(m, 0, attention=True)
            rest = torch.cat([lm.forward_text(seq[:, :, s:min(T, s + 8)])[1] for s in range(cut, T, 8)], 2)
        path = save_state(snap, tmp_path / "s.safetensors")
        back = load_state(path)
        names = sorted(k for k in back.tensors if k.startswith("layers.1."))
        assert any("pending_sum." in k for k in names) and any(k.endswith("pending_count") for k in names)
        assert back.pending_tokens(1) == cut % m.ttt.chunk_size
        other = load_model(name, device="cpu", dtype="fp32")  # resume in another model object
        assert check_fits(other, back).fits and fingerprint(other) == back.fingerprint
        with block_streaming(other.lm, 1, 8):
            restore(other, back, 0)
            again = torch.cat([other.lm.forward_text(seq[:, :, s:min(T, s + 8)])[1] for s in range(cut, T, 8)], 2)
    assert rel(again, rest) < 1e-6
    for target in ["tiny", *[p for p in PRESETS if p != name]]:
        rep = check_fits(load_model(target, device="cpu", dtype="fp32"), back)
        assert not rep.fits and not rep.forceable and rep.problems[0].kind == "variant"
        assert m.ttt.variant in rep.reason()
    # another rate is forceable, another chunk size is not; the rate override is the variant's own key
    rep = check_fits(load_model(name, device="cpu", dtype="fp32", ttt={"lr": 0.5}), back)
    assert rep.forceable and [p.kind for p in rep.problems] == ["hyper"] and m.ttt.rate_key in rep.reason()
    rep = check_fits(load_model(name, device="cpu", dtype="fp32", ttt={"chunk_size": 4}), back)
    assert not rep.forceable and "chunk_size" in rep.reason()


def test_fingerprint_covers_projections_not_the_rate(models):
    m = models["tiny-mlp"]
    fp = fingerprint(m)
    assert fingerprint(load_model("tiny-mlp", device="cpu", dtype="fp32", ttt={"lr": 0.0})) == fp
    other = load_model("tiny-mlp", device="cpu", dtype="fp32")
    with torch.no_grad():
        ttt_layers(other.lm)[3].lr_weight.add_(1e-3)  # not θ0, but part of what the layer computes
    assert fingerprint(other) != fp


# -- eval policies --------------------------------------------------------------------------------

def forward_nll(lm, codes):
    """NLL [dep_q, T] of moshi's own full-sequence LMModel.forward (the variant starts from θ0 in it)."""
    with torch.no_grad():
        out = lm.forward(codes[None])
    logp = out.logits[0].float().log_softmax(-1)
    nll = -logp.gather(-1, codes[1:1 + lm.dep_q].clamp(min=0)[..., None])[..., 0]
    return torch.where(out.mask[0], nll, torch.full_like(nll, math.nan))


@pytest.mark.parametrize("name", PRESETS)
def test_policies_off_document_and_resets(models, name):
    m = models[name]
    lm = m.lm
    codes = random_codes(lm, 1, 40, seed=4)[0]
    codes[0] = -1  # the default text layout
    ok = lambda a, b: torch.equal(a.isnan(), b.isnan()) and rel(a[~a.isnan()], b[~b.isnan()]) < 1e-4  # noqa: E731
    frozen = load_model(name, device="cpu", dtype="fp32", ttt={"lr": 0})
    with policy_settings(lm, False, m.ttt.rate):
        off = score_document(lm, codes, block_steps=16).nll
    assert ok(off, forward_nll(frozen.lm, codes)) and ttt_layers(lm)[1].get_rate() == m.ttt.rate
    doc = score_document(lm, codes, block_steps=16)
    assert ok(doc.nll, forward_nll(lm, codes)) and not ok(doc.nll, off)
    assert doc.telemetry[1]["updates"] == 40 // m.ttt.chunk_size and doc.telemetry[1]["relative_drift"] > 0
    # every:12 steps vs one forward_text per step with the fast weights reset by hand before 12, 24, 36
    got = score_document(lm, codes, resets=[12, 24, 36], block_steps=16).nll
    assert ok(got, stepwise_nll_with_resets(lm, codes, {12, 24, 36})) and not ok(got, doc.nll)


def stepwise_nll_with_resets(lm, codes, resets):
    """NLL [dep_q, T]: moshi's streaming, one `forward_text` per step on inputs built by hand, every TTT
    layer reset (`reset_streaming`) before the steps in `resets`; scored by moshi's depformer."""
    from test_eval import hand_input
    T = codes.shape[1]
    outs = []
    with torch.no_grad(), lm.streaming(1):
        for s in range(T):
            if s in resets:
                for layer in ttt_layers(lm).values():
                    layer.reset_streaming(torch.ones(1, dtype=torch.bool))
            outs.append(lm.forward_text(hand_input(lm, codes, s))[0])
        targets = torch.cat([hand_input(lm, codes, s + 1) for s in range(T)], 2)  # [1, K, T]
        logp = lm.forward_depformer_training(targets, torch.cat(outs, 1))[0].log_softmax(-1)  # [dep_q, T, card]
    nll = torch.full((lm.dep_q, T), math.nan)
    for k in range(lm.dep_q):
        d = lm.delays[1 + k]
        for t in range(T - d):
            nll[k, t] = -logp[k, t + d, codes[1 + k, t]]
    return nll


# -- checkpoints and commands -----------------------------------------------------------------------

def test_config_keys_depend_on_the_variant():
    with pytest.raises(ConfigError, match=r"variant 'mlp'.*conv_padding.*Valid keys: variant, layers, chunk_size, "
                                          r"num_heads, base_lr"):
        load_model("tiny-mlp", device="cpu", ttt={"conv_padding": "center"})
    m = load_model("tiny-adapter", device="cpu", ttt={"lr": 0.25})
    assert m.ttt.lr_scale == 0.25 and ttt_layers(m.lm)[1].get_rate() == 0.25
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.in_projs\.0\.ttt_adapter\.wq has shape \[16, 64\]"):
        load_model("tiny-adapter", device="cpu", ttt={"rank": 4})
    with pytest.raises(ConfigError, match="not adaptable"):
        load_model("tiny-adapter", device="cpu", ttt={"targets": ["gating.linear_up"]})


@pytest.mark.parametrize("variant", ["mlp", "linear-adapter"])
def test_init_checkpoint_writes_the_documented_fresh_init(variant, plain, tmp_path):
    out = tmp_path / variant
    r = run(["init-checkpoint", "--preset", "tiny", "--variant", variant, "--layers", "0,2", "--out", str(out),
             "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ttt"]["variant"] == variant and res["ttt"]["layers"] == [0, 2]
    t = load_file(str(out / "ttt.safetensors"))
    if variant == "mlp":
        assert "not neutral" in res["notes"][0]
        pre = "transformer.layers.2.ttt."
        assert t[pre + "W1"].shape == (4, 16, 64) and t[pre + "W2"].shape == (4, 64, 16)
        assert abs(t[pre + "wq.weight"].std().item() - 0.02) < 0.004 and abs(t[pre + "W1"].std().item() - 0.02) < 0.003
        assert torch.all(t[pre + "gating_alpha"] == 0.05) and torch.all(t[pre + "ttt_norm_weight"] == 1)
        assert all(torch.all(t[pre + k] == 0) for k in ("wq.bias", "wo.bias", "b1", "b2", "lr_bias", "post_norm.bias"))
        assert json.loads((out / "config.json").read_text())["ttt"]["num_heads"] == 4
    else:
        pre = "transformer.layers.0.gating.linear_out.ttt_adapter."
        assert t[pre + "wq"].shape == (32, 176) and t[pre + "wo"].shape == (64, 32) and t[pre + "W1"].shape == (1, 32, 32)
        assert torch.all(t[pre + "wo"] == 0) and t[pre + "lr_gate"].item() == -2.0 and torch.all(t[pre + "b1"] == 0)
        bound = 1 / math.sqrt(176)  # kaiming-uniform(a=√5) like LoRA's A
        assert t[pre + "wq"].abs().max() <= bound and t[pre + "wq"].abs().max() > 0.9 * bound
        m = load_model(str(out), device="cpu", dtype="fp32")  # Wo = 0: exactly plain moshi
        codes = random_codes(m.lm, 1, 20)
        with torch.no_grad():
            assert max_diff(m.lm.forward(codes).logits, plain.lm.forward(codes).logits) <= 1e-5


def _lora_checkpoint(tmp_path, plain, ttt_section=None):
    """tiny + a moshi LoRA (`lora.safetensors` in moshi lora.py's format: lora_A/lora_B of every nn.Linear,
    named by `lora_name`)."""
    out = tmp_path / "lora"
    shutil.copytree(preset_dir("tiny"), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update({"lora": True, "lora_rank": 4, "lora_scaling": 2.0, "lora_name": "lora.safetensors"})
    cfg.pop("ttt")
    if ttt_section is not None:
        cfg["ttt"] = ttt_section
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(7)
    lora = {}
    for name, mod in plain.lm.named_modules():
        if isinstance(mod, torch.nn.Linear):
            lora[f"{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.1
            lora[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.1
    save_file(lora, str(out / "lora.safetensors"))
    return out


def test_moshi_lora_checkpoints_load_and_compare_with_adapters(tmp_path, plain):
    from moshi.models.loaders import get_moshi_lm
    out = _lora_checkpoint(tmp_path, plain, {"variant": "linear-adapter", "layers": [1], "chunk_size": 8, "rank": 4})
    with pytest.warns(UserWarning, match="fresh TTT-Linear adapters"):  # the section names no tensor file
        m = load_model(str(out), device="cpu", dtype="fp32", ttt={"lr": 0})
    cfg = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k in m.info.lm_config}
    ref = get_moshi_lm(str(out / "model.safetensors"), lm_kwargs=cfg, device="cpu", dtype=torch.float32,
                       lora_weights=str(out / "lora.safetensors"))
    codes = random_codes(m.lm, 1, 20, seed=6)
    with torch.no_grad():
        got, want, base = m.lm.forward(codes).logits, ref.forward(codes).logits, plain.lm.forward(codes).logits
    # fresh adapters (Wo = 0) beside moshi's LoRA-wrapped linears: exactly moshi's LoRA model
    assert max_diff(got, want) <= 1e-5 and max_diff(want, base) > 1e-3
    data = tmp_path / "data" / "spk" / "book"
    data.mkdir(parents=True)
    shutil.copy(HELLO, data / "1.wav")
    r = run(["eval", "librilight", str(tmp_path / "data"), "--model", str(out), "-p", "off", "--out",
             str(tmp_path / "ev"), "--codes-cache", str(tmp_path / "cache"), "--json"])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    d = root / "data" / "spk" / "book"
    d.mkdir(parents=True)
    shutil.copy(HELLO, d / "1.wav")
    return root


@pytest.mark.parametrize("name", PRESETS)
def test_commands_run_on_variant_presets(name, data, tmp_path):
    variant = load_model(name, device="cpu").ttt.variant
    saved = tmp_path / "after-hello.safetensors"
    r = run(["infer", str(HELLO), "--model", name, "--out", str(tmp_path / "inf"), "--greedy", "--save-state",
             str(saved), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rec = out["results"][0] if "results" in out else out
    assert rec["ttt"]["config"]["variant"] == variant and rec["ttt"]["telemetry"]["1"]["updates"] > 0
    assert "fast-weight memory" in r.stderr
    r = run(["eval", "librilight", str(data / "data"), "--model", name, "-p", "off", "-p", "document",
             "--init-state", str(saved), "--out", str(tmp_path / "ev"), "--codes-cache", str(data / "cache"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    pol = res["policies"]
    assert pol["off"]["nll"] != pol["document"]["nll"] and pol["off"]["ttt"]["on"] is False
    assert pol["document"]["ttt"]["warm_start"] and not pol["off"]["ttt"]["warm_start"]
    st = tmp_path / "st"
    r = run(["export-state", str(HELLO), "--model", name, "--out", str(st), "--at", "2s", "--json"])
    assert r.exit_code == 0, r.output
    a, b = sorted(st.iterdir())
    r = run(["inspect-state", str(b), "--model", name, "--json"])
    assert r.exit_code == 0, r.output
    ins = json.loads(r.stdout)
    assert ins["fit"]["fits"] and ins["layers"][0]["relative_drift"] > 0
    r = run(["diff-state", str(a), str(b), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["layers"][0]["diff_norm"] > 0
    other = [p for p in PRESETS if p != name][0]
    r = run(["inspect-state", str(b), "--model", other])
    assert r.exit_code == 2 and "variant" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("source,variant", [("tiny-mlp", "inplace"), ("tiny-adapter", "inplace"), ("tiny", "mlp")])
def test_another_variant_on_a_checkpoint_gets_its_fresh_init(source, variant):
    """`ttt bench` puts every variant on one base: the checkpoint's tensors file belongs to its own variant,
    so another one is attached with its documented fresh init (and says so), never from foreign keys."""
    with pytest.warns(UserWarning, match="lacks TTT tensors"):
        m = load_model(source, device="cpu", dtype="fp32", ttt={"variant": variant})
    layers = ttt_layers(m.lm)
    assert m.ttt.variant == variant and layers and all(l.variant == variant for l in layers.values())
    if variant == "inplace":  # SPEC §3.6 by hand: W0 is linear_out's weight as the checkpoint's file holds it
        base = load_file(str(preset_dir(source) / "model.safetensors"))
        for i, layer in layers.items():
            assert torch.equal(layer.w_down, base[f"transformer.layers.{i}.gating.linear_out.weight"].float()), i
