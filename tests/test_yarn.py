"""YaRN (SPEC §4.3): the fork's frequencies and query factor against the formula evaluated here, scale 1
identical to plain moshi (built by moshi's own loader from the same files), streaming identical to a full
forward past the original and the extended context."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moshi.modules.rope import RotaryEmbedding
from ttt_cli import load_model
from ttt_cli.models.yarn import YarnConfig, YarnRotaryEmbedding, yarn_attention_factor, yarn_inv_freq


def formula(D, max_period, scale, L, beta_fast, beta_slow):
    """f_j = max_period^(-j/(D/2)), λ_j = 2π/f_j, r_j = clamp((λ_j - β_slow·L) / (β_fast·L - β_slow·L), 0, 1),
    f'_j = (1 - r_j) f_j + r_j f_j / scale: float64, then float32 as the SPEC says."""
    j = np.arange(D // 2, dtype=np.float64)
    f = max_period ** (-j / (D // 2))
    r = np.clip((2 * np.pi / f - beta_slow * L) / (beta_fast * L - beta_slow * L), 0.0, 1.0)
    return torch.from_numpy((1 - r) * f + r * f / scale).float()


@pytest.mark.parametrize("D,max_period,scale,L,bf,bs", [
    (128, 10000.0, 4.0, 3000, 32, 1),     # Moshi 7B heads, the author's ×4
    (16, 10000.0, 4.0, 32, 32, 1),        # tiny
    (64, 500000.0, 8.0, 1024, 16.0, 2.0),
    (128, 10000.0, 1.0, 3000, 32, 1),     # scale 1: the base frequencies
])
def test_frequencies_follow_the_formula(D, max_period, scale, L, bf, bs):
    cfg = YarnConfig(scale=scale, original_max_seq_len=L, beta_fast=bf, beta_slow=bs)
    got = yarn_inv_freq(D, max_period, cfg)
    want = formula(D, max_period, scale, L, bf, bs)
    assert got.dtype == torch.float32 and got.shape == (D // 2,)
    assert torch.allclose(got, want, rtol=2e-6, atol=0)
    if scale > 1:  # the ramp really blends: high frequencies kept, low ones lowered
        base = formula(D, max_period, 1.0, L, bf, bs)
        assert (got == base).any() and (got < base * 0.99).any()


def test_attention_factor():
    def m(s, x):
        return 0.1 * x * math.log(s) + 1.0
    assert yarn_attention_factor(YarnConfig(scale=4.0)) == 1.0  # mscale 1: no factor (the fork)
    assert yarn_attention_factor(YarnConfig(scale=4.0, mscale=1.0, mscale_all_dim=2.0)) == 1.0
    assert math.isclose(yarn_attention_factor(YarnConfig(scale=4.0, mscale=0.7)), m(4.0, 0.7), rel_tol=1e-15)
    assert math.isclose(yarn_attention_factor(YarnConfig(scale=8.0, mscale=1.5, mscale_all_dim=0.5)),
                        m(8.0, 1.5) / m(8.0, 0.5), rel_tol=1e-15)
    assert yarn_attention_factor(YarnConfig(scale=1.0, mscale=2.0)) == 1.0


def test_config_validation():
    assert YarnConfig.from_dict({"enabled": False, "scale": 4}, 3000) is None
    assert YarnConfig.from_dict({"scale": 4}, 250).original_max_seq_len == 250
    with pytest.raises(Exception, match="Valid keys"):
        YarnConfig.from_dict({"scale": 4, "factor": 2}, 3000)
    with pytest.raises(Exception, match="must differ"):
        YarnConfig.from_dict({"scale": 4, "beta_fast": 1, "beta_slow": 1}, 3000)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("time_before_heads", [False, True])
def test_rotation_with_moshis_frequencies_is_moshis_rope_bit_for_bit(interleave, time_before_heads):
    D, mp = 16, 10000.0
    moshi = RotaryEmbedding(interleave=interleave, max_period=mp)
    base_freqs = torch.exp(torch.arange(D // 2, dtype=torch.float32) * (-math.log(mp) * 2 / D))
    ours = YarnRotaryEmbedding(base_freqs, 1.0, interleave, mp)
    g = torch.Generator().manual_seed(0)
    shape = (3, 7, 4, D) if time_before_heads else (3, 4, 7, D)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)
        offset = torch.tensor([0, 5, 3001])
        for a, b in zip(ours(q, k, offset, time_before_heads), moshi(q, k, offset, time_before_heads)):
            assert torch.equal(a, b)
    # the attention factor scales the rotated queries only
    scaled = YarnRotaryEmbedding(base_freqs, 1.25, interleave, mp)
    q, k = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    (q1, k1), (q2, k2) = scaled(q, k, offset, time_before_heads), ours(q, k, offset, time_before_heads)
    assert torch.equal(k1, k2) and torch.allclose(q1, 1.25 * q2, rtol=1e-6)


def _init(tmp_path, name, *args):
    from ttt_cli.cli.app import app
    out = tmp_path / name
    r = CliRunner().invoke(app, ["init-checkpoint", "--preset", "tiny", "--out", str(out), "--json", *args])
    assert r.exit_code == 0, r.output
    return out


def _codes(lm, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, lm.card, (2, lm.num_codebooks, T), generator=g)
    c[:, 0] = torch.randint(0, lm.text_card, (2, T), generator=g)
    return c


def test_scale_one_is_plain_moshi(tmp_path):
    """A checkpoint with YaRN scale 1 (TTT off) gives bit for bit the logits of moshi's own LMModel, built by
    moshi's loader from the same files with the sections moshi does not know (`ttt`, `yarn_config`) left out."""
    from moshi.models.loaders import CheckpointInfo
    d = _init(tmp_path, "one", "--yarn-scale", "1")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["yarn_config"]["scale"] == 1.0 and cfg["context"] == 32
    one = load_model(str(d), device="cpu", dtype="fp32", ttt=False)
    assert type(one.lm.transformer.rope) is RotaryEmbedding and one.lm.transformer.layers[0].self_attn.context == 32
    moshi_cfg = tmp_path / "moshi_config.json"
    moshi_cfg.write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("ttt", "yarn_config")}))
    info = CheckpointInfo.from_hf_repo("unused/offline", moshi_weights=d / "model.safetensors",
                                       mimi_weights=d / "mimi.safetensors", tokenizer=d / "tokenizer.model",
                                       config_path=moshi_cfg, mimi_config_path=d / "mimi_config.json")
    plain = info.get_moshi(device="cpu", dtype=torch.float32)
    c = _codes(plain, 60)  # past the 32-step context
    with torch.no_grad():
        a, b = plain(c), one.lm(c)
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())


def test_streaming_equals_full_forward_past_the_original_context(tmp_path):
    out = _init(tmp_path, "yarn4", "--yarn-scale", "4")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["context"] == 32 and cfg["yarn_config"] == {
        "enabled": True, "scale": 4.0, "original_max_seq_len": 32, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
        "mscale_all_dim": 0.0}
    m = load_model(str(out), device="cpu", dtype="fp32")
    lm = m.lm
    assert isinstance(lm.transformer.rope, YarnRotaryEmbedding)
    assert all(l.self_attn.rope is lm.transformer.rope and l.self_attn.context == 128 for l in lm.transformer.layers)
    assert m.config["provenance"]["yarn"]["replaced_rope"]
    T = 160  # > 128, the extended context (the attention cache wraps), > 32, the original one; several TTT chunks
    seq = _codes(lm, T)
    with torch.no_grad():
        full, full_text = lm.forward_text(seq)
        outs, texts = [], []
        with lm.streaming(2):
            for t in range(T):
                o, tx = lm.forward_text(seq[:, :, t:t + 1])
                outs.append(o)
                texts.append(tx)
    stream = torch.cat(outs, 1)
    rel = ((stream - full).norm(dim=-1) / full.norm(dim=-1)).max().item()
    assert rel <= 1e-4
    assert torch.allclose(torch.cat(texts, 2), full_text, rtol=1e-4, atol=1e-4)
    # and YaRN changes the model (frequencies and context): compare with the checkpoint without it
    plain = load_model(str(_init(tmp_path, "plain")), device="cpu", dtype="fp32")
    with torch.no_grad():
        other, _ = plain.lm.forward_text(seq)
    assert ((other - full).norm(dim=-1) / full.norm(dim=-1)).max().item() > 1e-2
