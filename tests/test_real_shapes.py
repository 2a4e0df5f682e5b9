"""Real-shape presets (SPEC §8.7): moshi 7B's config on the meta device, the memory estimate and its refusal."""

import pytest
import torch

from ttt_cli.errors import ConfigError


@pytest.fixture(scope="module")
def meta_7b():
    """moshi-7b-random's LM with its TTT layers attached, on the meta device (never built for real)."""
    from moshi.models.loaders import get_moshi_lm
    from ttt_cli.fastweights.attach import attach_ttt
    from ttt_cli.fastweights.config import FastWeightConfig
    from ttt_cli.models.presets import TTT_SECTIONS, random_lm_config

    cfg = random_lm_config("moshi-7b-random")
    lm = get_moshi_lm(None, lm_kwargs=cfg, device="meta", dtype=torch.bfloat16)
    plain = sum(p.numel() for p in lm.parameters())
    layers = attach_ttt(lm, FastWeightConfig.from_dict(TTT_SECTIONS["moshi-7b-random"]))
    return lm, layers, plain


def test_moshi_7b_random_has_moshi_7b_shapes(meta_7b):
    from moshi.models.loaders import _lm_kwargs
    from ttt_cli.models.presets import random_lm_config

    lm, layers, plain = meta_7b
    assert random_lm_config("moshi-7b-random") == _lm_kwargs  # moshi's own 7B config, unchanged
    assert random_lm_config("moshi-7b-layer") == {**_lm_kwargs, "num_layers": 1}
    assert len(lm.transformer.layers) == 32 and lm.dim == 4096 and lm.depformer is not None and lm.dep_q == 8
    assert sorted(layers) == [0, 6, 12, 18, 24, 30]
    h = int(4096 * 4.125 * 2 / 3)  # moshi's gated MLP hidden size: 2/3 of hidden_scale·d
    for layer in layers.values():
        assert (layer.dim, layer.hidden, layer.chunk_size) == (4096, h, 512)
        assert layer.w_down.device.type == "meta" and layer.w_down.dtype == torch.float32
    assert 7.6e9 < plain < 7.8e9  # Moshi 7B


def test_memory_estimate_is_weights_plus_state_plus_headroom(meta_7b):
    """SPEC §8.7's arithmetic by hand: plain moshi's parameters in the run dtype, the TTT tensors (W0, conv with
    K = 2, W_target) in float32, one stream's state (d·h + C(h+d))·4 per TTT layer, times 1.2."""
    from ttt_cli.models.presets import memory_estimate

    lm, layers, plain = meta_7b
    d, h, C = 4096, 11264, 512
    ttt = 6 * (d * h + d * d * 2 + d * d)
    state = 6 * (d * h + C * (h + d)) * 4
    for dtype, item in ((torch.bfloat16, 2), (torch.float32, 4)):
        need, words = memory_estimate(lm, dtype, layers)
        assert need == int(1.2 * (plain * item + ttt * 4 + state)), dtype
        assert "headroom" in words and "GiB" in words
    fp32, _ = memory_estimate(lm, torch.float32, layers)
    assert fp32 > 24 * 2**30  # SPEC: fp32 on a 24 GB CPU is refused
    assert memory_estimate(lm, torch.bfloat16, layers)[0] < 24 * 2**30


def test_a_preset_that_does_not_fit_is_refused_with_the_arithmetic(monkeypatch):
    """Refused before any weight is drawn (the device is said to hold 1 GiB)."""
    from ttt_cli import load_model
    from ttt_cli.models import presets

    monkeypatch.setattr(presets, "device_memory", lambda device: 2**30)
    with pytest.raises(ConfigError, match=r"does not fit cpu: .*LM weights x 4 B \(float32\).*headroom.* > 1.0 GiB"):
        load_model("moshi-7b-layer", device="cpu", dtype="fp32")
