"""The causal mini-batch learner of ttt-lm (SPEC §3.9): inner model, closed-form gradients, dual form, streaming state.

Per head, token t (the i-th of its mini-batch) is read with θ_t = θ_start − (1/i)·Σ_{s≤t} η_s ∇ℓ_s(θ_start)
and the output is o_t = q_t + LN(f_θt(q_t)); when the mini-batch completes θ_start moves to θ of its
last token. Every gradient is taken at θ_start, so for an inner layer z = h·W + b the update is a sum
of outer products a_sᵀ g_s (a_s: the layer input for key s, g_s = ∂ℓ_s/∂z) and the query side is
h_t·W − (1/i)·[h_t·S_W + S_b + Σ_{s≤t} η_s (h_t·a_s + 1) g_s] with (S_W, S_b) the running sums of the
pending tokens of earlier calls: ttt-lm-pytorch's dual form, extended across calls. All math float32.
This module holds the calls over T tokens; the per-stream state is `learner_state`'s, the one-token call
`learner_token`'s, the closed-form pieces `learner_math`'s, and whole mini-batches that every stream starts
empty take `learner_scan`'s fast path.
"""

from __future__ import annotations

import typing as tp

import torch

from .interface import HostClock
from .learner_math import F32, Norm, frozen_outputs, gradient_sums, key_gradients, query_outputs
from .learner_scan import scan_mini_batches
from .learner_state import LearnerState
from .learner_token import TokenInputs, learn_token, learn_token_one_head

__all__ = ["F32", "Norm", "flush", "frozen_outputs", "learn"]


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
