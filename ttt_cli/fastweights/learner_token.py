"""The learner's one-token call (`LMGen.step`, SPEC §8.6): the dual form for L = 1 in few fused tensor ops, for the
general learner (`learn_token`) and for a one-head linear one whose token its layer lays out (`learn_token_one_head`).
The completion is the caller's (`learner.learn`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .learner_math import F32, Norm, gelu_tanh
from .learner_state import LearnerState


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
    _count(st, live)
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
    _count(st, live)
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


def _count(st: LearnerState, live: torch.Tensor | None) -> None:
    """A token more in `count` and `tokens` of the live streams (None: of every stream, one scalar add)."""
    if live is None:
        st.steps.add_(1)
    else:
        st.steps.add_(live)
