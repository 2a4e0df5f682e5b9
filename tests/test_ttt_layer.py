"""The In-Place TTT layer against the naive per-token loop written from the SPEC (tests/naive_ttt.py), and
the SPEC §3.4 equivalences."""


from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from naive_ttt import NaiveStream, checkpoint_ttt, naive_target, naive_ttt
from streaming_checks import full_equals_blocks, random_codes, rel
from ttt_cli.fastweights.attach import attach_ttt, ttt_layers
from ttt_cli.codes import transformer_input
from ttt_cli.fastweights.config import TTTConfig
from ttt_cli.fastweights.inplace import InPlaceTTTGating, X0Source
from ttt_cli.models.presets import preset_dir
from ttt_cli.streaming import block_streaming

D, H = 6, 10


def naive_layer(z, x0, w0, conv_w, w_target, C, lr, padding, clip=None):
    """Outputs [T, d] and the final W of one stream, token by token (tests/naive_ttt.py's loop)."""
    st = NaiveStream(w0, conv_w, w_target, C, lr, padding, clip)
    return torch.stack([st.step(z[t], x0[t]) for t in range(z.shape[0])]), st.w


@dataclass
class Drawn:
    """What a test gave the layer: its settings and the tensors drawn for it (W0 is linear_out's weight, SPEC
    §3.6). The reference is computed from these, never from the layer, so a setting or tensor the layer
    dropped or mixed up shows as a difference."""
    C: int
    lr: float
    padding: str
    clip: float | None
    w_in: torch.Tensor      # [2h, d] moshi's linear_in
    w0: torch.Tensor        # [d, h]  linear_out = W0
    conv: torch.Tensor      # [d, d, K]
    w_target: torch.Tensor  # [d, d]


def make_layer(C=4, lr=0.3, K=2, padding="right", clip=None, seed=0):
    """(layer, X0 source, Drawn) with random weights and random targets, so that every tap matters."""
    g = torch.Generator().manual_seed(seed)
    drawn = Drawn(C, lr, padding, clip, torch.randn(2 * H, D, generator=g) * 0.5, torch.randn(D, H, generator=g) * 0.5,
                  torch.randn(D, D, K, generator=g) * 0.3, torch.randn(D, D, generator=g) * 0.3)
    lin_in = nn.Linear(D, 2 * H, bias=False)
    lin_out = nn.Linear(H, D, bias=False)
    with torch.no_grad():
        lin_in.weight.copy_(drawn.w_in)
        lin_out.weight.copy_(drawn.w0)
    cfg = TTTConfig(layers=[0], chunk_size=C, lr=lr, conv_kernel_size=K, conv_padding=padding,
                    delta_clip_fro_norm=clip)
    src = X0Source()
    layer = InPlaceTTTGating(lin_in, lin_out, torch.nn.functional.silu, cfg, src)
    with torch.no_grad():
        layer.target_generator.conv1d.conv.weight.copy_(drawn.conv)
        layer.target_generator.W_target.weight.copy_(drawn.w_target)
    return layer, src, drawn


def drawn_z(drawn, x):
    """Z = silu(x W_gateᵀ) ⊙ (x W_upᵀ) from the drawn linear_in, in float64 (moshi's ActivationGating): [B, T, h]."""
    hu = F.linear(x.double(), drawn.w_in.double())
    hu = hu.view(*hu.shape[:2], 2, -1)
    return F.silu(hu[..., 0, :]) * hu[..., 1, :]


@torch.no_grad()
def reference(drawn, x, x0):
    """Outputs [B, T, d] and final W [B, d, h] of the naive loop, per stream, from what the test drew."""
    z = drawn_z(drawn, x)
    outs = [naive_layer(z[b], x0[b].double(), drawn.w0.double(), drawn.conv.double(), drawn.w_target.double(),
                        drawn.C, drawn.lr, drawn.padding, drawn.clip)
            for b in range(x.shape[0])]
    return torch.stack([o for o, _ in outs]), torch.stack([w for _, w in outs])


def call(layer, src, x, x0):
    src.input = x0
    return layer(x)


@pytest.mark.parametrize("padding,K", [("right", 2), ("right", 3), ("center", 3), ("center", 4)])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_layer_full_and_streamed_match_naive_loop(padding, K, clip):
    layer, src, drawn = make_layer(C=4, K=K, padding=padding, clip=clip)
    B, T = 2, 14  # three full chunks and a partial one
    x, x0 = torch.randn(B, T, D), torch.randn(B, T, D)
    ref, ref_w = reference(drawn, x, x0)
    with torch.no_grad():
        full = call(layer, src, x, x0)
        assert rel(full, ref) < 1e-4
        for block in (1, 3, 4, 7, T):
            with layer.streaming(B):
                outs = [call(layer, src, x[:, s:s + block], x0[:, s:s + block]) for s in range(0, T, block)]
                st = layer._streaming_state
                assert st.n_pending == [T % 4] * B
                assert rel(st.w, ref_w) < 1e-4
            assert rel(torch.cat(outs, 1), ref) < 1e-4, block
    if clip is not None:  # the clip must have fired for this test to mean anything
        with torch.no_grad(), layer.streaming(B):
            call(layer, src, x, x0)
            assert layer.telemetry(0)["clip_events"] == 3


def test_lr_zero_is_moshis_gating():
    """The layer's helper (Z) and its frozen output against moshi's own ActivationGating."""
    from moshi.modules.gating import ActivationGating
    layer, src, _ = make_layer(lr=0.0)
    ref = ActivationGating(D, 3 * H // 2, torch.nn.functional.silu)  # hidden = 2/3 · dim_feedforward = H
    ref.linear_in, ref.linear_out = layer.linear_in, layer.linear_out
    x, x0 = torch.randn(2, 9, D), torch.randn(2, 9, D)
    with torch.no_grad():
        assert torch.allclose(call(layer, src, x, x0), ref(x), atol=1e-6)
        assert torch.allclose(layer.hidden_activations(x) @ layer.linear_out.weight.T, ref(x), atol=1e-6)


def test_ntp_init_targets_next_token():
    for padding, K in (("right", 2), ("right", 3), ("center", 3), ("center", 5)):
        layer, _, _ = make_layer(K=K, padding=padding)
        layer.target_generator.init_ntp()
        x0 = torch.randn(3, 5, D)
        v = layer.target_generator(x0)
        assert torch.allclose(v[:, :-1], x0[:, 1:], atol=1e-6)
        assert torch.count_nonzero(v[:, -1]) == 0
    layer, _, _ = make_layer(K=2, padding="center")
    with pytest.raises(ValueError, match="K >= 3"):
        layer.target_generator.init_ntp()


def test_causality_in_layer():
    layer, src, _ = make_layer(C=4)
    x, x0 = torch.randn(1, 12, D), torch.randn(1, 12, D)
    with torch.no_grad():
        base = call(layer, src, x, x0)
        for p in (3, 4, 6, 9):  # inside a chunk and on chunk boundaries
            x2, x02 = x.clone(), x0.clone()
            x2[:, p:] += 1.0
            x02[:, p:] -= 2.0
            out = call(layer, src, x2, x02)
            assert torch.equal(out[:, :p], base[:, :p]), p
            assert not torch.allclose(out[:, p:], base[:, p:])


@pytest.mark.parametrize("one_token", [False, True], ids=["blocks", "one-token-steps"])
def test_reset_exec_mask_and_isolation(one_token):
    """Resets, exec masks and batch isolation against per-stream naive references, in multi-token calls and in
    one-token steps (the graph-safe step path, SPEC §8.6)."""
    layer, src, drawn = make_layer(C=4)
    B, T = 3, 6
    x, x0 = torch.randn(B, T, D), torch.randn(B, T, D)

    def call(layer, src, x, x0):
        if not one_token:
            return globals()["call"](layer, src, x, x0)
        return torch.cat([globals()["call"](layer, src, x[:, t:t + 1], x0[:, t:t + 1]) for t in range(x.shape[1])], 1)
    with torch.no_grad(), layer.streaming(B):
        call(layer, src, x, x0)
        st = layer._streaming_state
        w_before = st.w.clone()
        assert not torch.equal(w_before[1], drawn.w0)
        layer.reset_streaming(torch.tensor([False, True, False]))
        assert torch.equal(st.w[1], drawn.w0) and st.n_pending[1] == 0  # W0 as the test drew it, copied exactly
        assert torch.equal(st.w[0], w_before[0]) and torch.equal(st.w[2], w_before[2])
        assert st.n_pending[0] == st.n_pending[2] == 2
        # exec_mask false: item 2's weight and pending chunk are untouched by the step
        snap = layer.capture(2)
        layer.set_exec_mask(torch.tensor([True, True, False]))
        call(layer, src, x[:, :3], x0[:, :3])
        after = layer.capture(2)
        assert all(torch.equal(snap[k], after[k]) for k in snap)
        # streams now have different phases (0: 2+3, 1: 0+3 pending); each equals a run alone
        layer.set_exec_mask(torch.tensor([True, True, True]))
        out = call(layer, src, x[:, 3:], x0[:, 3:])
    seq0_x, seq0_x0 = torch.cat([x[0, :6], x[0, :3], x[0, 3:]])[None], torch.cat([x0[0, :6], x0[0, :3], x0[0, 3:]])[None]
    seq1_x, seq1_x0 = torch.cat([x[1, :3], x[1, 3:]])[None], torch.cat([x0[1, :3], x0[1, 3:]])[None]
    ref0, _ = reference(drawn, seq0_x, seq0_x0)
    ref1, _ = reference(drawn, seq1_x, seq1_x0)
    assert rel(out[0], ref0[0, -3:]) < 1e-4
    assert rel(out[1], ref1[0, -3:]) < 1e-4


def test_nonfinite_update_out_of_phase_resets_only_its_stream():
    """One-token steps with the streams out of phase (the update of only the completing stream, SPEC §8.9): a
    non-finite Δ resets that stream to W0 as the test drew it and is counted; the stream completing on another
    step, and the one not completing, keep the naive loop's weights."""
    layer, src, drawn = make_layer(C=2, lr=0.5)
    B, T = 3, 4
    x, x0 = torch.randn(B, T, D), torch.randn(B, T, D)
    x0[1, 3] = float("inf")  # stream 1's second chunk (tokens 2, 3 after its restart) is non-finite
    with torch.no_grad(), layer.streaming(B), pytest.warns(UserWarning, match="non-finite"):
        call(layer, src, x[:, :1], x0[:, :1])
        layer.reset_streaming(torch.tensor([False, True, False]))  # stream 1 restarts one token later
        layer.set_exec_mask(torch.tensor([True, True, False]))      # stream 2 never steps again
        for t in range(T):
            call(layer, src, x[:, t:t + 1], x0[:, t:t + 1])
        st = layer._streaming_state
        tel = [layer.telemetry(b) for b in range(B)]
    assert torch.equal(st.w[1], drawn.w0) and tel[1]["nonfinite_events"] == 1 and tel[1]["updates"] == 1
    _, w_ref = reference(drawn, torch.cat([x[:1, :1], x[:1]], 1), torch.cat([x0[:1, :1], x0[:1]], 1))
    assert rel(st.w[0], w_ref[0]) < 1e-4 and tel[0]["updates"] == 2 and tel[0]["nonfinite_events"] == 0
    assert torch.equal(st.w[2], drawn.w0) and tel[2]["updates"] == 0  # one pending token, never updated


def test_nonfinite_update_resets_to_w0():
    """A non-finite chunk (whole-batch update) resets its stream to W0 as drawn, from weights that had moved
    away from it, is counted, and the stream learns on from W0 like a fresh one (the naive loop)."""
    layer, src, drawn = make_layer(C=2, lr=1.0)
    x, x0 = torch.randn(2, 6, D), torch.randn(2, 6, D)
    x0[1, 3] = float("inf")  # stream 1's second chunk
    with torch.no_grad(), layer.streaming(2), pytest.warns(UserWarning, match="non-finite"):
        call(layer, src, x[:, :2], x0[:, :2])
        st = layer._streaming_state
        assert not torch.equal(st.w[1], drawn.w0)  # the first chunk moved it
        call(layer, src, x[:, 2:4], x0[:, 2:4])
        assert torch.isfinite(st.w).all()
        assert torch.equal(st.w[1], drawn.w0) and not torch.equal(st.w[0], drawn.w0)
        call(layer, src, x[:, 4:], x0[:, 4:])  # the stream goes on from W0
        assert layer.telemetry(1)["nonfinite_events"] == 1 and layer.telemetry(0)["nonfinite_events"] == 0
        assert layer.telemetry(0)["updates"] == 3 and layer.telemetry(1)["updates"] == 2
        _, w_ref = reference(drawn, x[1:, 4:], x0[1:, 4:])
        assert rel(st.w[1], w_ref[0]) < 1e-4

def test_flush_partial_applies_pending_chunk():
    layer, src, drawn = make_layer(C=4)
    x, x0 = torch.randn(1, 6, D), torch.randn(1, 6, D)
    _, w_after_first = reference(drawn, x[:, :4], x0[:, :4])
    z = drawn_z(drawn, x)[0]
    v = naive_target(x0[0, 4:6].double(), drawn.conv.double(), drawn.w_target.double(), "right")
    expect = w_after_first[0] + 0.3 * (v.T @ z[4:6])  # make_layer's lr
    with torch.no_grad(), layer.streaming(1):
        call(layer, src, x, x0)
        layer.flush_partial(0)
        assert layer._streaming_state.n_pending[0] == 0
        assert rel(layer._streaming_state.w[0], expect) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_float32_fast_weights(dtype):
    """SPEC §3.3: in a bf16/fp16 model, Z comes out of moshi's linear_in in the model dtype, but W, V̂, Δ and
    the output matmul are float32; only the output is cast back. W after three updates must match the
    float64 loop on the same Z to float32 precision (an update in half precision is off by ~1e-3), and
    every output must be the float64 reference rounded once to the model dtype."""
    layer, src, drawn = make_layer(C=4, lr=0.3)
    layer.to(dtype)  # what lm.to(dtype) does: slow weights cast, fast-weight tensors stay float32
    assert layer.linear_in.weight.dtype == dtype and layer.w_down.dtype == torch.float32
    B, T = 2, 14
    g = torch.Generator().manual_seed(3)
    x, x0 = torch.randn(B, T, D, generator=g).to(dtype), torch.randn(B, T, D, generator=g).to(dtype)
    with torch.no_grad(), layer.streaming(B):
        out = torch.cat([call(layer, src, x[:, s:s + 5], x0[:, s:s + 5]) for s in range(0, T, 5)], 1)
        w = layer._streaming_state.w.clone()
    assert out.dtype == dtype and w.dtype == torch.float32
    hu = F.linear(x, drawn.w_in.to(dtype)).view(B, T, 2, -1)  # in the model dtype, as moshi
    z = (F.silu(hu[..., 0, :]) * hu[..., 1, :]).double()
    for b in range(B):
        ref, ref_w = naive_layer(z[b], x0[b].double(), drawn.w0.double(), drawn.conv.double(),
                                 drawn.w_target.double(), 4, 0.3, "right")
        assert ((w[b].double() - ref_w).norm() / ref_w.norm()).item() < 1e-6
        unit = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # one rounding to the model dtype
        err = (out[b].double() - ref).abs()
        assert (err <= unit * ref.abs() + 1e-6).all(), (err / ref.abs()).max().item()


# -- the layer inside moshi's LMModel ------------------------------------------------------------

@pytest.fixture(scope="module")
def plain():
    from ttt_cli import load_model
    return load_model("tiny", device="cpu", dtype="fp32", ttt=False)


@pytest.mark.parametrize("source", ["input", "text"])
def test_model_full_vs_blocks_vs_naive(tiny, plain, source):
    lm = tiny.lm
    layers = ttt_layers(lm)
    for layer in layers.values():
        layer.target_source = source
    try:
        C = tiny.ttt.chunk_size
        T = 2 * C + 5  # two chunks and a partial one, beyond the 32-step attention context
        codes = random_codes(lm, 1, T)
        seq = transformer_input(lm, codes)
        with torch.no_grad():
            full = full_equals_blocks(lm, seq, (1, 7, C))
            # plain moshi, one step at a time, with the naive per-token loop in place of the TTT layers
            cfg, tensors = checkpoint_ttt(preset_dir("tiny"))
            with naive_ttt(plain.lm, {**cfg, "target_source": source}, tensors), plain.lm.streaming(1):
                naive = torch.cat([plain.lm.forward_text(seq[:, :, s:s + 1])[1] for s in range(T)], 2)
            assert rel(naive, full) < 1e-4
            # and TTT really changes the output (lr > 0 on tiny)
            _, frozen = plain.lm.forward_text(seq)
            assert rel(frozen, full) > 1e-3
    finally:
        for layer in layers.values():
            layer.target_source = "input"


def test_model_causality_and_batch_isolation(tiny):
    lm = tiny.lm
    C = tiny.ttt.chunk_size
    T = 2 * C + 3
    codes = random_codes(lm, 3, T, seed=1)
    with torch.no_grad():
        _, base = lm.forward_text(transformer_input(lm, codes))
        for p in (C - 2, C, C + 5):
            c2 = codes.clone()
            c2[:, :, p:] = random_codes(lm, 3, T - p, seed=p)
            _, out = lm.forward_text(transformer_input(lm, c2))
            # position s predicts step s from steps < s (plus delayed codebooks), so s <= p is unchanged
            assert torch.equal(out[:, :, :p + 1], base[:, :, :p + 1]), p
        for b in range(3):
            _, alone = lm.forward_text(transformer_input(lm, codes[b:b + 1]))
            assert rel(alone, base[b:b + 1]) < 1e-5
        # streaming: item 1 reset mid-stream -> out of phase; each item equals its own run
        with block_streaming(lm, 3, 5):
            seq = transformer_input(lm, codes)
            lm.forward_text(seq[:, :, :7])
            for layer in ttt_layers(lm).values():
                layer.reset_streaming(torch.tensor([False, True, False]))
            tail = lm.forward_text(seq[:, :, 7:12])[1]
            w_item0 = [layer._streaming_state.w[0].clone() for layer in ttt_layers(lm).values()]
        with block_streaming(lm, 1, 5):
            s0 = transformer_input(lm, codes[:1])
            lm.forward_text(s0[:, :, :7])
            alone_tail = lm.forward_text(s0[:, :, 7:12])[1]
            assert all(torch.allclose(w, layer._streaming_state.w[0], atol=1e-6)
                       for w, layer in zip(w_item0, ttt_layers(lm).values()))
        assert rel(tail[:1], alone_tail) < 1e-5


def test_attach_after_streaming_was_used():
    """Pitfall 10: moshi caches streaming children on first use; layers attached later must still stream."""
    from ttt_cli import load_model
    m = load_model("tiny", device="cpu", dtype="fp32", ttt=False)
    with m.lm.streaming(1):  # fills moshi's _cached_children without any TTT layer
        pass
    layers = attach_ttt(m.lm, TTTConfig(layers=[0, 2], chunk_size=4, lr=0.1))
    seq = transformer_input(m.lm, random_codes(m.lm, 1, 9))
    with torch.no_grad(), m.lm.streaming(1):
        m.lm.forward_text(seq)
        assert all(l.is_streaming and l.telemetry(0)["updates"] == 2 for l in layers.values())


def test_fast_weights_stay_float32_in_bf16():
    from ttt_cli import load_model
    m = load_model("tiny", device="cpu", dtype="bf16")
    layer = ttt_layers(m.lm)[1]
    assert layer.w_down.dtype == torch.float32
    m.lm.to(torch.float16)
    assert layer.w_down.dtype == torch.float32
    assert layer.target_generator.W_target.weight.dtype == torch.float32
    assert layer.linear_in.weight.dtype == torch.float16
    codes = random_codes(m.lm, 1, 20)
    with torch.no_grad(), m.lm.streaming(1):
        _, logits = m.lm.forward_text(transformer_input(m.lm, codes)[:, :, :20].to(torch.long))
        assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
        assert layer._streaming_state.w.dtype == torch.float32


def test_folded_target_follows_its_weights():
    """The folded target (W_target folded into the conv kernel, cached) against the naive loop, in both paddings,
    and again after each weight changes in place, is reloaded and is replaced: a stale cached fold shows."""
    from ttt_cli.fastweights.inplace_target import TargetGenerator
    g = torch.Generator().manual_seed(5)
    for padding, K in (("right", 2), ("center", 3)):
        tg = TargetGenerator(D, K, padding)
        x0 = torch.randn(2, 7, D, generator=g)

        def check(what):
            conv_w, w_t = tg.conv1d.conv.weight.detach(), tg.W_target.weight.detach()
            ref = torch.stack([naive_target(x0[n], conv_w, w_t, padding) for n in range(2)])
            assert rel(tg(x0, folded=True), ref) < 1e-5, (padding, what)
        with torch.no_grad():
            check("first")
            tg.conv1d.conv.weight.mul_(-2.0)
            check("conv changed in place")
            tg.W_target.weight.add_(torch.randn(D, D, generator=g))
            check("W_target changed in place")
            tg.load_state_dict({k: torch.randn(v.shape, generator=g) for k, v in tg.state_dict().items()})
            check("reloaded")
            tg.W_target.weight = nn.Parameter(torch.randn(D, D, generator=g))
            check("W_target replaced")
