"""The `mlp` and `linear-adapter` fast-weight layers against references written here from SPEC §3.9–§3.11:
a naive per-token float64 loop with autograd gradients, and ttt-lm's dual-form equations by hand."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from streaming_checks import rel
from ttt_cli.fastweights.adapter import AdapterGroup, TTTAdapterLinear
from ttt_cli.fastweights.config import AdapterConfig, MLPConfig
from ttt_cli.fastweights.learner import learn
from ttt_cli.fastweights.learner_state import LearnerState
from ttt_cli.fastweights.mlp import HybridTTTBlock

D, HEADS = 8, 2  # mlp: p = 4
IN, OUT, RANK = 6, 5, 3
TARGET = "self_attn.out_projs.0"


# -- the reference: SPEC §3.9 token by token, float64, gradients by autograd ------------------------

def ln(z, g, b, eps=1e-6):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return g * (z - mu) / torch.sqrt(var + eps) + b


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def inner(kind, th, x):
    z = x @ th["W1"] + th["b1"]
    return z if kind == "linear" else gelu_tanh(z) @ th["W2"] + th["b2"]


def naive_learner(kind, theta0, gamma, beta, q, k, y, eta, C, pending=0):
    """One stream: q, k, y [H, T, p], eta [H, T]; theta0 {name: [H, ...]}. Returns outputs [H, T, p] and, per
    head, the final θ_start, running sum and pending count. Mini-batches start at `-pending`."""
    q, k, y, eta, gamma, beta = (t.double() for t in (q, k, y, eta, gamma, beta))
    H, T, p = q.shape
    out = torch.zeros(H, T, p, dtype=torch.float64)
    finals = []
    for h in range(H):
        start = {n: v[h].double().clone() for n, v in theta0.items()}
        run = {n: torch.zeros_like(v) for n, v in start.items()}
        i = pending
        for t in range(T):
            with torch.enable_grad():
                th = {n: v.clone().requires_grad_(True) for n, v in start.items()}
                loss = 0.5 * ((ln(inner(kind, th, k[h, t]), gamma[h], beta[h]) - y[h, t]) ** 2).sum()
                grads = torch.autograd.grad(loss, list(th.values()))
            i += 1
            for n, g in zip(th, grads):
                run[n] = run[n] + eta[h, t] * g
            theta_t = {n: start[n] - run[n] / i for n in start}
            out[h, t] = q[h, t] + ln(inner(kind, theta_t, q[h, t]), gamma[h], beta[h])
            if i == C:  # mini-batch complete: θ_start moves to the last token's θ
                start, run, i = theta_t, {n: torch.zeros_like(v) for n, v in start.items()}, 0
        finals.append((start, run, i))
    return out, finals


def mlp_reference(block, x, eta_off=False):
    """TTT block output [B, T, d] from SPEC §3.10's formulas (float64), the learner by `naive_learner`."""
    P = {n: v.detach().double() for n, v in block.named_parameters()}
    B, T, d = x.shape
    H, p = block.heads, block.head_dim
    x = x.double()

    def heads(t):
        return t.view(B, T, H, p).permute(0, 2, 1, 3)  # [B, H, T, p]

    def proj(name):
        return heads(x @ P[f"{name}.weight"].T + P[f"{name}.bias"])

    q, k, v = proj("wq"), proj("wk"), proj("wv")
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    vk = v - k
    mu = vk.mean(-1, keepdim=True)
    std = torch.sqrt(((vk - mu) ** 2).sum(-1, keepdim=True) / (p - 1))  # unbiased
    g, b = P["ttt_norm_weight"][:, None], P["ttt_norm_bias"][:, None]
    y = g * (vk - mu) / (std + 1e-8) + b
    eta = block.base_lr * torch.sigmoid(torch.einsum("btd,hd->bht", x, P["lr_weight"]) + P["lr_bias"][:, None]) / p
    if eta_off:
        eta = torch.zeros_like(eta)
    theta0 = {n: P[n] for n in ("W1", "b1", "W2", "b2")}
    o = torch.stack([naive_learner("mlp", theta0, P["ttt_norm_weight"], P["ttt_norm_bias"], q[i], k[i], y[i],
                                   eta[i], block.chunk_size)[0] for i in range(B)])
    o = o.permute(0, 2, 1, 3).reshape(B, T, d)
    post = ln(o, P["post_norm.weight"], P["post_norm.bias"])
    return torch.tanh(P["gating_alpha"]) * (post @ P["wo.weight"].T + P["wo.bias"])


def adapter_reference(lin, x):
    """base(x) + scale · o Wo^T by SPEC §3.11 (float64)."""
    P = {n: v.detach().double() for n, v in lin.ttt_adapter.named_parameters()}
    group = lin._group
    x = x.double()
    q, k, v = x @ P["wq"].T, x @ P["wk"].T, x @ P["wv"].T  # [B, T, r]
    eta = (group.lr_scale * torch.sigmoid(P["lr_gate"])).expand(q.shape[:2])
    o = torch.stack([naive_learner("linear", {"W1": P["W1"], "b1": P["b1"]}, P["ttt_norm_weight"],
                                   P["ttt_norm_bias"], q[i][None], k[i][None], (v - k)[i][None], eta[i][None],
                                   group.chunk_size)[0][0] for i in range(x.shape[0])])
    return x @ lin.weight.double().T + group.scale * o @ P["wo"].T


# -- the layers under test ----------------------------------------------------------------------------

def make_mlp(C=3, base_lr=3.0, seed=0):
    """(block, θ0 as drawn here {W1, b1, W2, b2})."""
    block = HybridTTTBlock(D, HEADS, MLPConfig(layers=[0], chunk_size=C, num_heads=HEADS, base_lr=base_lr))
    g = torch.Generator().manual_seed(seed)
    drawn = {}
    with torch.no_grad():
        for name, t in block.named_parameters():
            drawn[name] = torch.randn(t.shape, generator=g) * (0.2 if "lr_" in name else 0.6)
            t.copy_(drawn[name])
        block.ttt_norm_weight.add_(1.0)
    return block, {n: drawn[n] for n in ("W1", "b1", "W2", "b2")}


def make_adapter(C=3, lr_scale=3.0, seed=0):
    """(group, adapted linear, θ0 as drawn here {TARGET.W1, TARGET.b1})."""
    cfg = AdapterConfig(layers=[0], chunk_size=C, targets=[TARGET], rank=RANK, scale=1.5, lr_scale=lr_scale)
    group = AdapterGroup(cfg)
    base = nn.Linear(IN, OUT, bias=False)
    lin = TTTAdapterLinear(base, TARGET, RANK, group)
    group.add(lin)
    g = torch.Generator().manual_seed(seed)
    drawn = {}
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g))
        for name, t in lin.ttt_adapter.named_parameters():
            drawn[name] = torch.randn(t.shape, generator=g) * 0.6
            t.copy_(drawn[name])
        lin.ttt_adapter.ttt_norm_weight.add_(1.0)
    return group, lin, {f"{TARGET}.{n}": drawn[n] for n in ("W1", "b1")}


class Harness:
    """One variant's layer seen the same way: call it, stream it, read its state; `theta0` is θ0 as the test
    drew it, keyed like the layer's snapshots (the reference for resets, never the layer's own copy).

    `small_theta` scales θ0 down to fresh-init size, where the inner LayerNorm's eps matters."""

    def __init__(self, variant, small_theta=False, **kw):
        self.variant = variant
        if variant == "mlp":
            self.layer, self.theta0 = make_mlp(**kw)
            self.fn, self.ref, self.dim = self.layer, lambda x: mlp_reference(self.layer, x), D
            params = dict(self.layer.named_parameters())
        else:
            self.layer, lin, self.theta0 = make_adapter(**kw)
            self.fn, self.ref, self.dim = lin, lambda x: adapter_reference(lin, x), IN
            params = {f"{TARGET}.{n}": t for n, t in lin.ttt_adapter.named_parameters()}
        if small_theta:
            with torch.no_grad():
                for k in self.theta0:
                    params[k].mul_(0.01)
                    self.theta0[k] = self.theta0[k] * 0.01

    def x(self, B, T, seed=1):
        return torch.randn(B, T, self.dim, generator=torch.Generator().manual_seed(seed))


VARIANTS = ["mlp", "linear-adapter"]


@pytest.mark.parametrize("small_theta", [False, True], ids=["theta", "small-theta"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_and_any_split_match_the_naive_loop(variant, small_theta):
    h = Harness(variant, small_theta)
    B, T = 2, 11  # three mini-batches of 3 and a partial one
    x = h.x(B, T)
    ref = h.ref(x)
    with torch.no_grad():
        assert rel(h.fn(x), ref) < 1e-4  # full-sequence form (a fresh state, not streaming)
        for split in ([1] * T, [7, 4], [3, 3, 3, 2], [2, 5, 1, 3], [T]):
            with h.layer.streaming(B):
                outs, s = [], 0
                for n in split:
                    outs.append(h.fn(x[:, s:s + n]))
                    s += n
                snap = h.layer.capture(1)
            assert rel(torch.cat(outs, 1), ref) < 1e-4, split
            counts = [v for k, v in snap.items() if k.endswith("pending_count")]
            assert counts and all(int(c) == T % 3 for c in counts)
    # TTT matters here: the same layer with η = 0 differs
    with torch.no_grad():
        h.layer.set_rate(0.0)
        frozen = h.fn(x)
    assert rel(frozen, ref) > 1e-2


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_learner_state_matches_the_naive_loop(inner_model):
    """θ_start, running sums and outputs of the streaming form, started mid-mini-batch, against the loop."""
    H, p, T, C = 2, 4, 9, 4
    g = torch.Generator().manual_seed(3)
    shapes = {"W1": (H, p, p), "b1": (H, p)} if inner_model == "linear" else \
        {"W1": (H, p, 4 * p), "b1": (H, 4 * p), "W2": (H, 4 * p, p), "b2": (H, p)}
    theta0 = {n: torch.randn(s, generator=g) * 0.5 for n, s in shapes.items()}
    gamma, beta = 1 + 0.3 * torch.randn(H, p, generator=g), 0.3 * torch.randn(H, p, generator=g)
    q, k, y = (torch.randn(1, H, T, p, generator=g) for _ in range(3))
    eta = torch.rand(1, H, T, generator=g)
    ref, finals = naive_learner(inner_model, theta0, gamma, beta, q[0], k[0], y[0], eta[0], C)
    st = LearnerState.fresh(theta0, 1, torch.device("cpu"))
    live = torch.ones(1, dtype=torch.bool)
    outs = [learn(st, inner_model, q[:, :, a:b], k[:, :, a:b], y[:, :, a:b], eta[:, :, a:b], gamma, beta, C, live,
                  theta0) for a, b in ((0, 2), (2, 3), (3, 9))]
    assert rel(torch.cat(outs, 2)[0], ref) < 1e-4
    for hd, (start, run, n) in enumerate(finals):
        assert int(st.count[0]) == n == T % C
        for name in shapes:
            assert rel(st.theta[name][0, hd], start[name]) < 1e-4
            assert rel(st.sums[name][0, hd], run[name]) < 1e-4
    assert int(st.updates[0]) == T // C and int(st.tokens[0]) == T


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_whole_mini_batches_in_one_call_with_a_nonfinite_one(inner_model):
    """One call of three whole mini-batches (the learner's scan path) on two streams, stream 1's second one with
    an infinite key: stream 0 as the naive loop; stream 1 as the loop over its first mini-batch, reset to θ0 after
    the second (SPEC §3.7) and the loop from θ0 over its third. Also with the bad key in the first mini-batch."""
    H, p, C = 2, 4, 3
    g = torch.Generator().manual_seed(5)
    shapes = {"W1": (H, p, p), "b1": (H, p)} if inner_model == "linear" else \
        {"W1": (H, p, 4 * p), "b1": (H, 4 * p), "W2": (H, 4 * p, p), "b2": (H, p)}
    theta0 = {n: torch.randn(s, generator=g) * 0.5 for n, s in shapes.items()}
    gamma, beta = 1 + 0.3 * torch.randn(H, p, generator=g), 0.3 * torch.randn(H, p, generator=g)
    q, k, y = (torch.randn(2, H, 3 * C, p, generator=g) for _ in range(3))
    eta = torch.rand(2, H, 3 * C, generator=g)
    for bad in (C + 1, 0):
        kb = k.clone()
        kb[1, :, bad] = float("inf")
        st = LearnerState.fresh(theta0, 2, torch.device("cpu"))
        with torch.no_grad():
            out = learn(st, inner_model, q, kb, y, eta, gamma, beta, C, torch.ones(2, dtype=torch.bool), theta0)
        ref0, fin0 = naive_learner(inner_model, theta0, gamma, beta, q[0], k[0], y[0], eta[0], C)
        assert rel(out[0], ref0) < 1e-4
        first = bad // C  # the mini-batch whose update is not finite
        kept = range(0, first * C)  # before it: the loop from θ0
        if first:
            ref1, _ = naive_learner(inner_model, theta0, gamma, beta, q[1, :, kept], k[1, :, kept], y[1, :, kept],
                                    eta[1, :, kept], C)
            assert rel(out[1, :, kept], ref1) < 1e-4
        after = slice((first + 1) * C, 3 * C)  # after it: the loop from θ0 again, on what follows
        ref2, fin2 = naive_learner(inner_model, theta0, gamma, beta, q[1, :, after], k[1, :, after], y[1, :, after],
                                   eta[1, :, after], C)
        assert rel(out[1, :, after], ref2) < 1e-4
        for hd in range(H):
            for name in shapes:
                assert rel(st.theta[name][0, hd], fin0[hd][0][name]) < 1e-4
                assert rel(st.theta[name][1, hd], fin2[hd][0][name]) < 1e-4
        assert st.nonfinite.tolist() == [0, 1] and st.updates.tolist() == [3, 2] and st.count.tolist() == [0, 0]


def test_mlp_full_sequence_equals_ttt_lm_dual_form_by_hand():
    """Two mini-batches of ttt-lm's TTTMLP dual form, written from its equations (η_ts = lr_s / t)."""
    H, p, C = 1, 3, 4
    g = torch.Generator().manual_seed(5)
    W1, b1 = torch.randn(H, p, 4 * p, generator=g) * 0.5, torch.randn(H, 4 * p, generator=g) * 0.1
    W2, b2 = torch.randn(H, 4 * p, p, generator=g) * 0.5, torch.randn(H, p, generator=g) * 0.1
    gamma, beta = 1 + 0.2 * torch.randn(H, p, generator=g), 0.2 * torch.randn(H, p, generator=g)
    XQ, XK, XV = (torch.randn(2 * C, p, generator=g).double() for _ in range(3))
    lr = torch.rand(2 * C, generator=g).double()
    th = {"W1": W1[0].double(), "b1": b1[0].double(), "W2": W2[0].double(), "b2": b2[0].double()}
    G, Bt = gamma[0].double(), beta[0].double()
    outs = []
    for mb in range(2):
        sl = slice(mb * C, (mb + 1) * C)
        xq, xk, tgt, lr_mb = XQ[sl], XK[sl], XV[sl] - XK[sl], lr[sl]
        eta = torch.tril((1.0 / torch.arange(1, C + 1).double())[:, None] * lr_mb[None, :])  # eta[t, s]
        Z1 = xk @ th["W1"] + th["b1"]
        X2 = gelu_tanh(Z1)
        Z2 = (X2 @ th["W2"] + th["b2"]).requires_grad_(True)
        (gZ2,) = torch.autograd.grad(0.5 * ((ln(Z2, G, Bt) - tgt) ** 2).sum(), Z2)
        Z1r = Z1.clone().requires_grad_(True)
        (gZ1,) = torch.autograd.grad((gelu_tanh(Z1r) @ th["W2"] * gZ2).sum(), Z1r)
        b1_bar = th["b1"] - eta @ gZ1
        Z1_bar = xq @ th["W1"] - (eta * torch.tril(xq @ xk.T)) @ gZ1 + b1_bar
        X2_bar = gelu_tanh(Z1_bar)
        b2_bar = th["b2"] - eta @ gZ2
        Z2_bar = X2_bar @ th["W2"] - (eta * torch.tril(X2_bar @ X2.T)) @ gZ2 + b2_bar
        outs.append(xq + ln(Z2_bar, G, Bt))
        last = eta[-1][:, None]  # [C, 1]
        th = {"W1": th["W1"] - (last * xk).T @ gZ1, "b1": th["b1"] - (last * gZ1).sum(0),
              "W2": th["W2"] - (last * X2).T @ gZ2, "b2": th["b2"] - (last * gZ2).sum(0)}
    theta0 = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    st = LearnerState.fresh(theta0, 1, torch.device("cpu"))
    f = lambda t: t.float()[None, None]  # noqa: E731
    got = learn(st, "mlp", f(XQ), f(XK), f(XV - XK), lr.float()[None, None], gamma, beta, C,
                torch.ones(1, dtype=torch.bool), theta0)
    assert rel(got[0, 0], torch.cat(outs)) < 1e-4
    for n in th:
        assert rel(st.theta[n][0, 0], th[n]) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    h = Harness(variant)
    x = h.x(1, 10)
    with torch.no_grad():
        base = h.fn(x)
        for pos in (2, 3, 5, 9):  # inside a mini-batch and on its boundaries
            x2 = x.clone()
            x2[:, pos:] += 1.5
            out = h.fn(x2)
            assert torch.equal(out[:, :pos], base[:, :pos]), pos
            assert not torch.allclose(out[:, pos:], base[:, pos:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_isolation_reset_exec_mask_and_resume(variant):
    h = Harness(variant)
    layer = h.layer
    B = 3
    x = h.x(B, 12)
    initial = h.theta0
    with torch.no_grad(), layer.streaming(B):
        h.fn(x[:, :5])
        before = [layer.capture(b) for b in range(B)]
        layer.reset_streaming(torch.tensor([False, True, False]))
        after = layer.capture(1)
        for name, t in after.items():  # exact reset: θ0, nothing pending
            want = initial[name] if name in initial else torch.zeros_like(t)
            assert torch.equal(t, want), name
        for b in (0, 2):
            assert all(torch.equal(v, layer.capture(b)[k]) for k, v in before[b].items())
        # exec mask false: stream 2 is untouched by a one-token step and by a two-token call
        layer.set_exec_mask(torch.tensor([True, True, False]))
        h.fn(x[:, 5:6])
        h.fn(x[:, 6:8])
        assert all(torch.equal(v, layer.capture(2)[k]) for k, v in before[2].items())
        layer.set_exec_mask(torch.ones(B, dtype=torch.bool))
        # streams are out of phase now (8, 3 and 5 tokens since their start); a snapshot of stream 0
        snap = layer.capture(0)
        tail = h.fn(x[:, 8:])
        tel = layer.telemetry(1)
        assert tel["resets"] == 1 and tel["tokens"] == 7 and tel["pending_tokens"] == 7 % 3
    # each stream equals a run alone over what it saw
    seq0 = x[0:1]
    seq1 = x[1:2, 5:]
    seq2 = torch.cat([x[2:3, :5], x[2:3, 8:]], 1)
    with torch.no_grad():
        for b, seq in ((0, seq0), (1, seq1), (2, seq2)):
            alone = h.fn(seq)
            assert rel(tail[b], alone[0, -4:]) < 1e-4, b
        # a batch item does not depend on the batch size or the other items
        assert rel(h.fn(x)[1:2], h.fn(x[1:2])) < 1e-5
        # resume: stream 0's snapshot restored into a fresh stream continues exactly
        with layer.streaming(1):
            layer.restore(snap, 0)
            resumed = h.fn(x[:1, 8:])
    assert rel(resumed, tail[:1]) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_warm_start_and_frozen(variant):
    h = Harness(variant)
    layer = h.layer
    x = h.x(2, 8)
    with torch.no_grad(), layer.streaming(2):
        h.fn(x[:, :7])
        warm = layer.capture(0)
    with torch.no_grad():
        layer.set_warm_start(warm)
        with layer.streaming(2):
            fresh = layer.capture(1)
            h.fn(x[:, :4])
            layer.reset_streaming(torch.tensor([True, False]))
            after_reset = layer.capture(0)
        for snap in (fresh, after_reset):  # starts and resets go to the warm θ, never its pending sums
            for k, v in snap.items():
                want = torch.zeros_like(v) if "pending" in k else warm[k]
                assert torch.equal(v, want), k
        layer.set_warm_start(None)
        # rate 0: frozen at θ0 = the learner with η = 0; the state never moves
        layer.set_rate(0.0)
        with layer.streaming(2):
            out = h.fn(x)
            for k, v in layer.capture(0).items():
                assert torch.equal(v, h.theta0[k] if k in h.theta0 else torch.zeros_like(v)), k
            assert layer.state_bytes_per_stream() < 100
    if variant == "mlp":
        assert rel(out, mlp_reference(layer, x, eta_off=True)) < 1e-4
    else:
        with torch.no_grad():
            layer.set_rate(3.0)
            layer.params(TARGET).lr_gate.fill_(-1e4)  # sigmoid = 0: η = 0 in the hand-written reference
        assert rel(out, h.ref(x)) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_update_resets_the_stream_and_warns_at_telemetry(variant):
    h = Harness(variant)
    layer = h.layer
    x = h.x(2, 6)
    x[1, 1] = float("inf")
    with torch.no_grad(), layer.streaming(2):
        h.fn(x[:, :3])  # the first mini-batch completes: stream 1's update is non-finite
        snap = layer.capture(1)
        assert set(h.theta0) < set(snap)
        for k, v in snap.items():
            assert torch.isfinite(v).all()
            if k in h.theta0:
                assert torch.equal(v, h.theta0[k]), k
        with pytest.warns(UserWarning, match="non-finite"):
            tel = layer.telemetry(1)
        assert tel["nonfinite_events"] >= 1 and tel["updates"] == 0
        assert layer.telemetry(0)["nonfinite_events"] == 0 and layer.telemetry(0)["updates"] == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_flush_partial_is_the_last_tokens_theta(variant):
    h = Harness(variant)
    layer = h.layer
    x = h.x(1, 5)  # one mini-batch of 3 and 2 pending
    with torch.no_grad(), layer.streaming(1):
        h.fn(x)
        s = layer.capture(0)
        layer.flush_partial(0)
        f = layer.capture(0)
    for k, v in s.items():
        if "pending" in k or k not in h.theta0:
            continue
        pre = k[: len(k) - len(k.split(".")[-1])]
        want = v - s[pre + "pending_sum." + k.split(".")[-1]] / 2
        assert rel(f[k], want) < 1e-6
    assert all(float(v) == 0 for k, v in f.items() if k.endswith("pending_count"))


def test_stacked_projection_follows_loads_and_moves():
    """The adapter's one-product projection (a cached stack made from wk, wq, wv) always gives [k, 1, q, 1, v − k]
    of the three matrices as they are now, and its cached η = lr_scale·sigmoid(lr_gate) and η-scaled norm follow
    lr_gate and γ: after an in-place load of one of them and after its storage is replaced (a device move)."""
    from ttt_cli.fastweights.adapter import AdapterParams

    p = AdapterParams(12, 10, 4)
    p.init_fresh(torch.Generator().manual_seed(0))
    h = torch.randn(3, 12)
    one = torch.ones(3, 1)

    def expected():
        k, q, v = h @ p.wk.T, h @ p.wq.T, h @ p.wv.T
        return torch.cat([k, one, q, one, v - k], 1)

    with torch.no_grad():
        torch.testing.assert_close(F.linear(h, *p.learning_projection()), expected())
        p.wk.copy_(torch.randn(4, 12))  # what load_tensors does
        torch.testing.assert_close(F.linear(h, *p.learning_projection()), expected())
        p.wv.data = torch.randn(4, 12)  # what a device move does: new storage
        torch.testing.assert_close(F.linear(h, *p.learning_projection()), expected())
        p.wq.data = torch.randn(4, 12)
        torch.testing.assert_close(F.linear(h, *p.learning_projection()), expected())
        assert float(p.eta(2.0)) == pytest.approx(2.0 / (1.0 + math.exp(2.0)))  # lr_gate −2
        p.lr_gate.fill_(0.5)
        assert float(p.eta(2.0)) == pytest.approx(2.0 / (1.0 + math.exp(-0.5)))
        assert float(p.eta(3.0)) == pytest.approx(3.0 / (1.0 + math.exp(-0.5)))
        # the η-scaled norm of the one-token step follows lr_gate and γ too
        p.ttt_norm_weight.copy_(torch.rand(1, 4) + 0.5)
        p.ttt_norm_bias.copy_(torch.randn(1, 4))
        eta = 3.0 / (1.0 + math.exp(-0.5))
        gn = p.grad_norm(3.0)
        torch.testing.assert_close(gn.g2[:, 0], eta * p.ttt_norm_weight ** 2)
        torch.testing.assert_close(gn.gamma[:, 0], eta * p.ttt_norm_weight)
        torch.testing.assert_close(gn.gbeta[:, 0], eta * p.ttt_norm_weight * p.ttt_norm_bias)
