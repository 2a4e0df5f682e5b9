"""The causal mini-batch learner of ttt-lm (SPEC §3.9): inner model, closed-form gradients, dual form, streaming state.

Per head, token t (the i-th of its mini-batch) is read with θ_t = θ_start − (1/i)·Σ_{s≤t} η_s ∇ℓ_s(θ_start)
and the output is o_t = q_t + LN(f_θt(q_t)); when the mini-batch completes θ_start moves to θ of its
last token. Every gradient is taken at θ_start, so for an inner layer z = h·W + b the update is a sum
of outer products a_sᵀ g_s (a_s: the layer input for key s, g_s = ∂ℓ_s/∂z) and the query side is
h_t·W − (1/i)·[h_t·S_W + S_b + Σ_{s≤t} η_s (h_t·a_s + 1) g_s] with (S_W, S_b) the running sums of the
pending tokens of earlier calls: ttt-lm-pytorch's dual form, extended across calls. All math float32.
This module holds the per-stream state and the calls; the closed-form pieces are `learner_math`'s, and whole
mini-batches that every stream starts empty take `learner_scan`'s fast path.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import torch

from .interface import HostClock
from .learner_math import F32, Norm, frozen_outputs, gelu_tanh, gradient_sums, key_gradients, query_outputs, tilde_of
from .learner_scan import scan_mini_batches

__all__ = ["F32", "LearnerState", "Norm", "TokenInputs", "flush", "frozen_outputs", "learn", "learn_token",
           "learn_token_one_head"]


# -- per-stream state -----------------------------------------------------------------------------

@dataclass
class LearnerState:
    """One learner's per-stream tensors: θ_start, the pending tokens' gradient sums and counters.

    Each inner layer j keeps θ̃_j = [W_j; b_j] in one tensor (and its pending sum S̃_j likewise), so that a token
    reads and learns with one product against x̃ = [x, 1]; `theta` and `sums` name views of them (W_j, b_j), which
    every in-place write goes through; `tilde_bh` and `sums_bh` are the same tensors as [B·H, n_in + 1, n_out] views,
    made once, for a one-token step's `bmm`s, and `tilde_wb`, `sums_wb` their (W [B·H, n_in, n_out], b [B·H, 1,
    n_out]) views, for a product whose input has no 1 appended (the bias row is `baddbmm`'s added term). Counters
    are tensors, so that a one-token step never reads device data on the host; `count` and `tokens` are the rows of
    `steps`, which a token advances in one op.
    """

    theta: dict[str, torch.Tensor]   # θ_start [B, H, ...]: views of `tilde`
    sums: dict[str, torch.Tensor]    # Σ η_s ∇ℓ_s(θ_start) of the pending tokens [B, H, ...]: views of `tilde_sums`
    count: torch.Tensor              # [B] long: pending tokens
    tokens: torch.Tensor             # [B] long: tokens since the last reset
    updates: torch.Tensor            # [B] long
    resets: torch.Tensor             # [B] long
    nonfinite: torch.Tensor          # [B] long
    tilde: list[torch.Tensor] = field(default_factory=list)       # θ̃_j [B, H, n_in + 1, n_out]
    tilde_sums: list[torch.Tensor] = field(default_factory=list)  # S̃_j [B, H, n_in + 1, n_out]
    tilde_bh: list[torch.Tensor] = field(default_factory=list)    # θ̃_j viewed [B·H, n_in + 1, n_out]
    sums_bh: list[torch.Tensor] = field(default_factory=list)     # S̃_j viewed [B·H, n_in + 1, n_out]
    steps: torch.Tensor | None = None                             # [2, B] long: the rows `count`, `tokens`
    tilde_wb: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (W̃_j, b̃_j) of `tilde_bh`
    sums_wb: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)   # the same of `sums_bh`

    @classmethod
    def fresh(cls, start: dict[str, torch.Tensor], batch_size: int, device: torch.device) -> "LearnerState":
        """Every stream at `start` ({W1, b1, ...: [H, ...]}; empty for a frozen learner: counters only)."""
        tilde, tilde_sums, theta, sums = [], [], {}, {}
        for j, t0 in enumerate(tilde_of(start), 1):
            t = t0.detach().to(device, F32).expand(batch_size, -1, -1, -1).clone()
            s = torch.zeros_like(t)
            tilde.append(t)
            tilde_sums.append(s)
            theta[f"W{j}"], theta[f"b{j}"] = t[:, :, :-1], t[:, :, -1]
            sums[f"W{j}"], sums[f"b{j}"] = s[:, :, :-1], s[:, :, -1]
        z = lambda: torch.zeros(batch_size, dtype=torch.long, device=device)  # noqa: E731
        steps = torch.zeros(2, batch_size, dtype=torch.long, device=device)
        bh = [t.view(-1, *t.shape[2:]) for t in tilde]
        sums_bh = [s.view(-1, *s.shape[2:]) for s in tilde_sums]
        wb = lambda ts: [(t[:, :-1], t[:, -1:]) for t in ts]  # noqa: E731
        return cls(theta, sums, steps[0], steps[1], z(), z(), z(), tilde, tilde_sums, bh, sums_bh, steps,
                   wb(bh), wb(sums_bh))

    def reset(self, mask: torch.Tensor, start: dict[str, torch.Tensor]) -> None:
        """Streams in `mask` go back to `start` with nothing pending (masked arithmetic, no host sync)."""
        for th, s, s0 in zip(self.tilde, self.tilde_sums, tilde_of(start)):
            torch.where(mask.view(-1, 1, 1, 1), s0, th, out=th)
            s.masked_fill_(mask.view(-1, 1, 1, 1), 0.0)
        self.count.masked_fill_(mask, 0)
        self.tokens.masked_fill_(mask, 0)
        self.resets.add_(mask.long())

    def complete(self, done: torch.Tensor | None, chunk_size: int, start: dict[str, torch.Tensor],
                 tap: tp.Any = None, back: int = 0, tokens: tp.Any = None) -> None:
        """Mini-batch end for the streams in `done` (None: every stream): θ_start ← θ_start − S/C. A
        non-finite result resets the stream to `start` instead and is counted (SPEC §3.7); θ_start was
        finite, so the result is non-finite exactly when the stream's pending sum is (or overflows).
        `tap` (a `recording.LearnerTap`) records the update series' rows: `back` positions of the call
        follow the completion, `tokens` were in the mini-batch (default C)."""
        before = {k: v.clone() for k, v in self.theta.items()} if tap is not None and tap.active else None
        finite = torch.stack([torch.isfinite(s.flatten(1).sum(1)) for s in self.tilde_sums]).all(0)  # [B]
        ok, bad = (finite, ~finite) if done is None else (done & finite, done & ~finite)
        shape = (-1, 1, 1, 1)  # [B] against [B, H, n_in + 1, n_out]
        for th, s in zip(self.tilde, self.tilde_sums):
            if done is None:
                th.sub_(s, alpha=1.0 / chunk_size)
                s.zero_()
            else:
                th.sub_(torch.where(done.view(shape), s, 0.0), alpha=1.0 / chunk_size)
                s.masked_fill_(done.view(shape), 0.0)
        for th, t0 in zip(self.tilde, tilde_of(start)):
            torch.where(bad.view(shape), t0, th, out=th)
        if done is None:
            self.count.zero_()
        else:
            self.count.masked_fill_(done, 0)
        self.updates.add_(ok.long())
        self.nonfinite.add_(bad.long())
        if before is not None:
            tap.completed(before, self.theta, ok, bad, back, chunk_size if tokens is None else tokens)


# -- the learner over a call of T tokens ----------------------------------------------------------

def _segments(counts: list[int], live: list[bool], T: int, C: int) -> tuple[list[tuple[int, int, list[int]]], list[int]]:
    """Cuts [0, T) where some live stream's mini-batch completes: ([(start, end, counts at start)], final counts)."""
    out = []
    t = 0
    counts = list(counts)
    while t < T:
        L = min([T - t] + [C - counts[b] for b in range(len(counts)) if live[b]])
        out.append((t, t + L, list(counts)))
        for b in range(len(counts)):
            if live[b]:
                counts[b] = (counts[b] + L) % C
        t += L
    return out, counts


_POSITIONS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _positions(c0: list[int], L: int, device: torch.device) -> torch.Tensor:
    """i of each token of a segment: [B, L] (or [1, L] when every stream is in the same phase), float."""
    if len(set(c0)) == 1:
        key = (c0[0], L, torch.device(device))
        if key not in _POSITIONS:
            _POSITIONS[key] = torch.arange(c0[0] + 1, c0[0] + L + 1, dtype=F32, device=device)[None]
        return _POSITIONS[key]
    return (torch.tensor(c0, device=device)[:, None] + torch.arange(1, L + 1, device=device)).to(F32)


def _add_sums(st: LearnerState, grads, eta: torch.Tensor, live: torch.Tensor | None) -> None:
    """S += Σ η_s ∇ℓ_s of a segment, for the live streams (None: all)."""
    for name, v in gradient_sums(grads, eta).items():
        if live is None:
            st.sums[name].add_(v)
        else:
            st.sums[name].add_(torch.where(live.view(-1, *([1] * (v.dim() - 1))), v, 0.0))


def learn_token(st: LearnerState, inner: str, q: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                eta: torch.Tensor, norm: Norm, live: torch.Tensor | None, chunk_size: int,
                pending: int | None = None) -> torch.Tensor:
    """The one-token call of `learn` without the completion: `key_gradients`, the sums' update and
    `query_outputs` for L = 1, in fewer and fused tensor ops (the step's cost at small d is per op, not per FLOP).

    With x̃ = [x, 1] against θ̃ = [W; b] the key and the query pass of the first inner layer are one product, and
    the dual form with s = t only, z = h̃·θ̃ − (1/i)·[h̃·S̃ + η (h̃·ã) g], is z = h̃·θ̃ − (1/i)·h̃·S̃' once the
    token's own gradient is in the sum (S̃' = S̃ + ãᵀ η g): the sums are updated first, then read.

    Args:
        st: the learner's per-stream state (sums and counters updated in place).
        q, k, y: [B,H,1,p] float32; eta: [B,H,1].
        norm: the learner's LayerNorm.
        live: [B] bool, or None when every stream is live (the host knows it: no masking ops).
        chunk_size: C (−1/i is read from a table of C entries).
        pending: the tokens every stream has pending before this one, when the host knows it is one number for
            all (−1/i is then a number, not a lookup of the device counts); None: look up each stream's.
    Returns:
        o [B,H,1,p] float32.
    """
    B, H, _, p = q.shape
    BH = B * H
    dev = q.device
    neg_inv_i = _neg_inv_i(st, chunk_size, pending, (-1, 1, 1, 1))  # [B,1,1,1] or a number
    # products as bmm on [B·H, ...] views: a 4-d matmul costs several dispatches more per call
    x = torch.cat([torch.cat([k, q], 2).view(BH, 2, p), _ones(BH, dev)], 2)  # [BH,2,p+1]: x̃ of key, query
    z1 = torch.bmm(x, st.tilde_bh[0])  # [BH,2,n1]: key and query, one product
    zk = z1[:, :1]  # [BH,1,n1]
    e = eta.reshape(BH, 1, 1)
    if inner == "linear":
        grads = [(x[:, :1], e * norm.l2_grad(zk.view(B, H, 1, -1), y).view(BH, 1, p))]  # (ã, η g)
    else:
        w2, b2 = st.tilde_wb[1]  # [BH,n1,p], [BH,1,p]
        a2 = gelu_tanh(zk)  # [BH,1,n1]: the second layer's input (its 1 is baddbmm's added bias row)
        eg2 = e * norm.l2_grad(torch.baddbmm(b2, a2, w2).view(B, H, 1, p), y).view(BH, 1, p)  # [BH,1,p]: η g2
        # η g1 from η g2 directly (g1 is linear in g2)
        eg1 = torch.ops.aten.gelu_backward(torch.bmm(eg2, w2.transpose(1, 2)), zk, approximate="tanh")  # [BH,1,n1]
        grads = [(x[:, :1], eg1), (a2, eg2)]
    # S̃ += ãᵀ(η g), in place: no [B,H,n_in+1,n_out] temporary is made (at B = 8 the mlp's sums are megabytes: a copy
    # costs more than the ops). Streams that are not live add an exact 0 (both factors zeroed, so even a non-finite
    # key of such a stream leaves its sums alone); when all are, the host said so and nothing is masked.
    if live is not None:
        mask = live.view(-1, 1, 1) if H == 1 else live.view(-1, 1, 1).expand(B, H, 1).reshape(BH, 1, 1)  # [B·H,1,1]
        zero = _zero(dev)
        grads = [(torch.where(mask, a, zero), torch.where(mask, eg, zero)) for a, eg in grads]
    st.sums_bh[0].baddbmm_(grads[0][0].transpose(1, 2), grads[0][1])
    z = _plus_scaled(z1[:, 1:].view(B, H, 1, -1), torch.bmm(x[:, 1:], st.sums_bh[0]).view(B, H, 1, -1), neg_inv_i)
    if inner == "mlp":
        s2w, s2b = st.sums_wb[1]
        a2, eg2 = grads[1]
        s2w.baddbmm_(a2.transpose(1, 2), eg2)
        s2b.add_(eg2)
        h = gelu_tanh(z).view(BH, 1, -1)  # [BH,1,n1]
        z = _plus_scaled(torch.baddbmm(b2, h, w2).view(B, H, 1, p), torch.baddbmm(s2b, h, s2w).view(B, H, 1, p),
                         neg_inv_i)
    if live is None:
        st.steps.add_(1)  # count and tokens of every stream
    else:
        st.steps.add_(live)
    return norm.out(q, z)


@dataclass
class TokenInputs:
    """One token of a one-head `linear` learner whose η is a constant of the learner, laid out by the layer's own
    projection (`learn_token_one_head`): nothing is concatenated, reshaped or scaled per token."""

    x: torch.Tensor     # [B, 2, p+1]: x̃ of the key and of the query (rows [k, 1] and [q, 1])
    y: torch.Tensor     # [B, 1, p]: the target
    grad_norm: Norm     # the learner's `Norm.scaled(η)`: its `l2_grad` is η·∇ℓ


def learn_token_one_head(st: LearnerState, tok: TokenInputs, norm: Norm, live: torch.Tensor | None,
                         chunk_size: int, pending: int | None = None) -> torch.Tensor:
    """`learn_token` for a `linear` inner model of one head on a `TokenInputs`: the same dual form in [B, L, ·]
    layout (no head axis to view in and out of), η folded into the gradient's constants.

    Args:
        st: the learner's per-stream state (sums and counters updated in place).
        tok: the token's x̃, target and η-scaled norm.
        norm: the learner's LayerNorm (for the output).
        live: [B] bool, or None when every stream is live.
        chunk_size: C.
        pending: as `learn_token`'s.
    Returns:
        o [B,1,p] float32.
    """
    x = tok.x
    dev = x.device
    neg_inv_i = _neg_inv_i(st, chunk_size, pending, (-1, 1, 1))  # [B,1,1] or a number
    z1 = torch.bmm(x, st.tilde_bh[0])  # [B,2,p]: key and query, one product
    a, eg = x[:, :1], tok.grad_norm.l2_grad(z1[:, :1], tok.y)  # [B,1,p+1] ã, [B,1,p] η g
    if live is not None:  # S̃ += ãᵀ(η g) as in `learn_token`: a stream that is not live adds an exact 0
        mask, zero = live.view(-1, 1, 1), _zero(dev)  # [B,1,1]
        a, eg = torch.where(mask, a, zero), torch.where(mask, eg, zero)
    st.sums_bh[0].baddbmm_(a.transpose(1, 2), eg)
    z = _plus_scaled(z1[:, 1:], torch.bmm(x[:, 1:], st.sums_bh[0]), neg_inv_i)  # [B,1,p]
    if live is None:
        st.steps.add_(1)  # count and tokens of every stream
    else:
        st.steps.add_(live)
    return norm.out(x[:, 1:, :-1], z)


_NEG_INV: dict[tuple[int, torch.device], torch.Tensor] = {}
_ZERO: dict[torch.device, torch.Tensor] = {}


def _zero(device: torch.device) -> torch.Tensor:
    """A cached float32 0-d zero: `torch.where` against it costs less than against a Python 0.0."""
    if device not in _ZERO:
        _ZERO[device] = torch.zeros((), dtype=F32, device=device)
    return _ZERO[device]


def _neg_inv_i(st: LearnerState, C: int, pending: int | None, shape: tuple[int, ...]) -> torch.Tensor | float:
    """−1/i of a one-token step's token (i = count + 1): a number when the host gave the one pending count of every
    stream, else each stream's from the device counts, viewed `shape`."""
    if pending is not None:
        return -1.0 / (pending + 1)
    return _neg_inv(C, st.count.device).index_select(0, st.count).view(shape)


def _plus_scaled(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """a + c·b, c a number or a tensor broadcastable against b."""
    return torch.add(a, b, alpha=c) if isinstance(c, float) else torch.addcmul(a, b, c)


def _neg_inv(C: int, device: torch.device) -> torch.Tensor:
    """A cached [C] float32 table of −1/i for count = i − 1 = 0 .. C − 1 (one lookup instead of two ops a token)."""
    key = (C, device)
    if key not in _NEG_INV:
        _NEG_INV[key] = (-1.0 / torch.arange(1, C + 1, dtype=torch.float64)).to(device, F32)
    return _NEG_INV[key]


_ONES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _ones(n: int, device: torch.device) -> torch.Tensor:
    """A cached [n, 2, 1] float32 of ones: the 1 of x̃ = [x, 1] for a one-token step's key and query."""
    key = (n, torch.device(device))
    if key not in _ONES:
        _ONES[key] = torch.ones(n, 2, 1, dtype=F32, device=device)
    return _ONES[key]


def _scan_run(st: LearnerState, inner: str, segments: list, i: int, qkye: tuple[torch.Tensor, ...],
              gamma: torch.Tensor, beta: torch.Tensor, C: int) -> tuple[int, torch.Tensor | None]:
    """`learner_scan` over the run of whole mini-batches that every stream starts empty from `segments[i]`:
    (the index after the run, its outputs); (i, None) without such a run, (j, None) when a result in it was not
    finite (the state untouched)."""
    j = i
    while j < len(segments) and segments[j][1] - segments[j][0] == C and not any(segments[j][2]):
        j += 1
    if j == i:
        return i, None
    a, e = segments[i][0], segments[j - 1][1]
    res = scan_mini_batches(st.theta, inner, *(x[:, :, a:e] for x in qkye), gamma, beta, C)
    if res is None:
        return j, None
    for name, v in res[1].items():
        st.theta[name].copy_(v)  # in place: the state's tensors keep their storage
    st.updates.add_(j - i)  # every stream is live and completed each mini-batch
    return j, res[0]


def learn(st: LearnerState, inner: str, q: torch.Tensor, k: torch.Tensor, y: torch.Tensor, eta: torch.Tensor,
          gamma: torch.Tensor, beta: torch.Tensor, chunk_size: int, live: torch.Tensor,
          start: dict[str, torch.Tensor], clock: "HostClock | None" = None, tap: tp.Any = None,
          norm: Norm | None = None, token: TokenInputs | None = None) -> torch.Tensor:
    """Reads and learns T tokens of every stream (apply, then update at each mini-batch end).

    A one-token call (`LMGen.step`) is pure tensor arithmetic (SPEC §8.6): the host clock says whether a
    live stream's mini-batch completes on this token, and only then is the masked completion part of
    the step; no device value is read on the host. A longer call cuts itself where a live stream's
    mini-batch completes, from the clock too (a per-mini-batch scan; the dual form inside); its whole
    mini-batches that every stream starts empty go through `learner_scan` (one host read of finiteness).

    Args:
        st: the learner's per-stream state (updated in place).
        q, k, y: queries, keys, targets [B,H,T,p] float32.
        eta: η_s [B,H,T] float32.
        live: [B] bool, the streams this call may change (moshi's exec mask).
        start: θ a reset or a non-finite update goes back to ({name: [H, ...]}).
        clock: the host-side mirror of the pending counts (advanced here unless a step plan was made);
            None: made from the device counts (one host read; for calls outside a streaming layer).
        tap: a `recording.LearnerTap` that records each completion (the update series), or None.
        norm: `Norm.of(gamma, beta)` if the caller keeps it (made here otherwise).
        token: for T = 1, the token as `learn_token_one_head` takes it (k, y and eta are then unused).
    Returns:
        o [B,H,T,p] float32.
    """
    T = q.shape[2]
    C = chunk_size
    if clock is None:
        clock = HostClock(C, st.count.tolist(), [bool(v) for v in live.tolist()])
    norm = norm or Norm.of(gamma, beta)
    if T == 1:
        # a step that runs its Python (not planned for a graph, whose replays run under whatever exec mask and
        # counts the host has then) masks nothing when the host's exec mask has every stream live, and takes −1/i
        # as a number when every stream has the same count pending
        eager = clock.planned is None
        mask = None if eager and all(clock.active) else live
        pending = clock.pending[0] if mask is None and len(set(clock.pending)) == 1 else None
        o = learn_token(st, inner, q, k, y, eta, norm, mask, C, pending) if token is None else \
            learn_token_one_head(st, token, norm, mask, C, pending).unsqueeze(1)
        done = clock.take()  # "step + update": decided on the host, never by reading the device
        if done:
            st.complete(None if len(done) == len(clock.active) else live & (st.count == C), C, start, tap)
        return o
    return _learn_segments(st, inner, q, k, y, eta, gamma, beta, norm, C, live, start, clock, tap)


def _learn_segments(st: LearnerState, inner: str, q: torch.Tensor, k: torch.Tensor, y: torch.Tensor,
                    eta: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, norm: Norm, C: int,
                    live: torch.Tensor, start: dict[str, torch.Tensor], clock: HostClock, tap: tp.Any) -> torch.Tensor:
    """`learn` for T > 1: segment by segment (cut where a live stream's mini-batch completes), whole mini-batches
    that every stream starts empty through `learner_scan`."""
    B, _, T, _ = q.shape
    counts, alive = list(clock.pending), list(clock.active)
    segments, final = _segments(counts, alive, T, C)
    # Runs of whole mini-batches that every stream starts empty take the scan (learner_scan), unless the update
    # series is recorded (a row per completion), a result there is not finite (then this path resets exactly)
    # or autograd follows the inputs (the scan writes its θ̃ in place: inference only).
    scan = all(alive) and not (tap is not None and tap.active) and not any(t.requires_grad for t in (q, k, y, eta))
    outs = []
    i = 0
    while i < len(segments):
        if scan:
            j, o = _scan_run(st, inner, segments, i, (q, k, y, eta), gamma, beta, C)
            if o is not None:
                outs.append(o)
                i = j
                continue
            scan = j == i  # no run here: try the next; a non-finite one: this path from now on
        a, b, c0 = segments[i]
        i += 1
        grads = key_gradients(inner, st.theta, k[:, :, a:b], y[:, :, a:b], norm)
        outs.append(query_outputs(st.theta, st.sums if any(c0) else None, q[:, :, a:b], grads, eta[:, :, a:b],
                                  _positions(c0, b - a, q.device), norm))
        _add_sums(st, grads, eta[:, :, a:b], None if all(alive) else live)
        done = [alive[j] and c0[j] + (b - a) == C for j in range(B)]
        if all(done):
            st.complete(None, C, start, tap, T - b)
        elif any(done):
            st.complete(torch.tensor(done, device=q.device), C, start, tap, T - b)
    st.count.copy_(torch.tensor(final))  # host to device: the clock is the truth
    clock.pending = final
    st.tokens.add_(live.long() * T)
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def flush(st: LearnerState, chunk_size: int, streams: torch.Tensor, start: dict[str, torch.Tensor],
          tap: tp.Any = None) -> None:
    """Applies the pending partial mini-batch of `streams` now: θ_start ← θ_start − S/n (θ of its last
    token), and chunk counting restarts."""
    n = st.count.clamp_min(1).to(F32)  # [B]
    has = streams & (st.count > 0)
    tokens = st.count.clone()
    for k in st.theta:
        shape = (-1, *([1] * (st.theta[k].dim() - 1)))
        # complete() divides by C: scale S so that S'/C = S/n for the flushed streams.
        st.sums[k].mul_(torch.where(has, chunk_size / n, torch.ones_like(n)).view(shape))
    st.complete(has, chunk_size, start, tap, 0, tokens)
