"""In-Place TTT's per-stream state and update rule: the graph-safe one-token step, multi-token calls in
chunk-aligned segments, flushes, and W += lr · clip(V̂ᵀZ) with its counters and update series (SPEC §3.3–3.7)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moshi.modules.streaming import State

from .inplace_target import TargetGenerator
from .interface import HostClock, refuse_graph_capture
from .recording import UpdateRecorder, squared_norms


def counter(batch_size: int, device) -> torch.Tensor:
    """A per-stream event counter [B] (long, zeros)."""
    return torch.zeros(batch_size, dtype=torch.long, device=device)


@dataclass
class InPlaceState(State):
    """Per-stream fast weight, pending chunk and counters, all tensors (the graph-safe step reads and
    writes only these). The host clock mirrors the pending counts, so that no step reads the device."""

    w: torch.Tensor | None = None          # [B, d, h] f32; None when frozen (lr = 0)
    pending_z: torch.Tensor | None = None  # [B, C, h] f32
    pending_x0: torch.Tensor | None = None  # [B, C, d] f32
    w_reset: torch.Tensor | None = None    # [d, h] what a reset restores (W0 or a warm start)
    clock: HostClock = field(default_factory=lambda: HostClock(1))
    count: torch.Tensor | None = None      # [B] long: pending tokens (the device copy of clock.pending)
    rows: torch.Tensor | None = None       # [B] long: b·C, the first pending row of stream b
    tokens: torch.Tensor | None = None     # [B] long counters, read when telemetry is written
    updates: torch.Tensor | None = None
    resets: torch.Tensor | None = None
    clip_events: torch.Tensor | None = None
    nonfinite_events: torch.Tensor | None = None
    recorder: UpdateRecorder | None = None  # the update series (SPEC §3.7), when recording

    @property
    def n_pending(self) -> list[int]:
        return self.clock.pending

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        super().set_exec_mask(exec_mask)
        if self.w is None:  # frozen (lr 0): nothing per stream to track
            return
        refuse_graph_capture(exec_mask)  # the host sets exec masks between steps, never inside a graph
        self.clock.active = [bool(v) for v in exec_mask.tolist()]

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        mask = reset_mask.to(self.tokens.device)
        self.clock.reset([bool(v) for v in reset_mask.tolist()])
        self.tokens.masked_fill_(mask, 0)
        self.resets.add_(mask.long())
        if self.w is not None:
            self.count.masked_fill_(mask, 0)
            self.w.copy_(torch.where(mask[:, None, None], self.w_reset, self.w))
        if self.recorder is not None:
            self.recorder.record_reset(reset_mask)


@dataclass(frozen=True)
class UpdateRule:
    """What a layer's chunk updates need from it (read from the layer at each call: `set_rate` changes `lr`)."""

    chunk_size: int
    target: TargetGenerator   # V̂ from the chunk's X0
    lr: float
    clip: float | None        # delta_clip_fro_norm (None: no clip)
    clip_eps: float
    w0: torch.Tensor          # [d, h] θ0, what the update series measures drift from


_STREAMS: dict[tuple[tuple[int, ...], int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def stream_index(streams: tuple[int, ...], batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N] long, mask [B] bool) of `streams`, made once per set and device and kept: a CUDA graph
    captured for the set reads them as constants, and making them again would copy from the host on the step."""
    key = (streams, batch_size, torch.device(device))
    if key not in _STREAMS:
        mask = torch.tensor([b in streams for b in range(batch_size)], dtype=torch.bool)
        _STREAMS[key] = (torch.tensor(streams, dtype=torch.long).to(device), mask.to(device))
    return _STREAMS[key]


def step_one(st: InPlaceState, rule: UpdateRule, z: torch.Tensor, x0: torch.Tensor,
             completing: tuple[int, ...]) -> torch.Tensor:
    """One token of every stream as tensor arithmetic only (SPEC §8.6): apply W, write the token's pending
    row, count the live streams, and, for the streams whose chunk the host clock says completes on this token
    (`completing`), the masked update. The update reads only those streams' chunks, so streams out of phase
    (refilled slots) cost in proportion to the completing streams, not to B (SPEC §8.9). Nothing is read
    back to the host.

    Args:
        z: [B, 1, h] hidden activations; x0: [B, 1, d] token embeddings (float32).
        completing: the live streams whose count reaches C on this token (the host clock's decision).
    """
    B, C = st.batch_size, rule.chunk_size
    out = torch.bmm(z, st.w.transpose(1, 2))  # [B, 1, d] with each stream's W
    live = st.exec_mask  # [B] bool
    # Each stream's token goes to its first free pending row. A frozen stream (exec mask false) writes
    # there too, but its count does not move, so the row stays free and its pending chunk (rows
    # < count) is untouched: no read-modify-write of the buffers is needed.
    rows = st.rows + st.count  # [B]
    st.pending_z.view(B * C, -1).index_copy_(0, rows, z[:, 0])
    st.pending_x0.view(B * C, -1).index_copy_(0, rows, x0[:, 0])
    st.count.add_(live.long())
    st.tokens.add_(live.long())
    if len(completing) == B:  # in phase: every stream's chunk, no gather
        done = live & (st.count == C)  # [B]
        update(st, rule, None, st.pending_z, st.pending_x0, done)
        st.count.masked_fill_(done, 0)
    elif completing:
        items, chosen = stream_index(completing, B, st.w.device)  # [N], [B]
        # The device counts agree with the host clock; the mask keeps a stream that does not complete
        # from being updated should they ever disagree.
        done = chosen & live & (st.count == C)  # [B]
        update(st, rule, items, st.pending_z[items], st.pending_x0[items], done[items])
        st.count.masked_fill_(done, 0)
    return out


def run_tokens(st: InPlaceState, rule: UpdateRule, z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Apply-then-update over T tokens, in segments that end where some stream's chunk ends.

    Args:
        z: [B, T, h] hidden activations; x0: [B, T, d] token embeddings (float32).
    Returns:
        [B, T, d] float32.
    """
    B, T, _ = z.shape
    C = rule.chunk_size
    outs = []
    t = 0
    live = [b for b in range(B) if st.clock.active[b]]
    while t < T:
        L = min([T - t] + [C - st.n_pending[b] for b in live])
        zs, xs = z[:, t:t + L], x0[:, t:t + L]
        outs.append(torch.bmm(zs, st.w.transpose(1, 2)))  # [B, L, d] with each stream's W
        synced = len(live) == B and len({st.n_pending[b] for b in live}) == 1
        if synced and st.n_pending[0] == 0 and L == C:
            update(st, rule, None, zs, xs, host=True, back=T - t - L)  # whole chunk in hand: no buffering
        else:
            _buffer(st, live, synced, zs, xs, L)
            done = [b for b in live if st.n_pending[b] == C]
            if done:
                ix = torch.tensor(done, device=z.device)
                update(st, rule, ix, st.pending_z[ix], st.pending_x0[ix], host=True, back=T - t - L)
            for b in done:
                st.n_pending[b] = 0
        t += L
    st.tokens.add_(st.exec_mask.long() * T)
    st.count.copy_(torch.tensor(st.n_pending))  # host to device: the clock is the truth
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def _buffer(st: InPlaceState, live: list[int], synced: bool, zs: torch.Tensor, xs: torch.Tensor, L: int) -> None:
    """Appends L tokens ([B, L, h], [B, L, d]) to the pending chunks of the live streams."""
    if synced:
        n = st.n_pending[0]
        st.pending_z[:, n:n + L] = zs
        st.pending_x0[:, n:n + L] = xs
    else:
        for b in live:
            n = st.n_pending[b]
            st.pending_z[b, n:n + L] = zs[b]
            st.pending_x0[b, n:n + L] = xs[b]
    for b in live:
        st.n_pending[b] += L


@torch.no_grad()
def flush(st: InPlaceState, rule: UpdateRule, batch_index: int | None = None) -> None:
    """Applies the pending partial chunk of stream `batch_index` (None: every stream) now."""
    if st.w is None:
        return
    items = range(st.batch_size) if batch_index is None else [batch_index]
    if st.recorder is not None:
        st.recorder.expect_flush()
    for b in items:
        n = st.n_pending[b]
        if n:
            ix = torch.tensor([b], device=st.w.device)
            update(st, rule, ix, st.pending_z[b:b + 1, :n], st.pending_x0[b:b + 1, :n], host=True)
            st.n_pending[b] = 0
            st.count[b] = 0


@torch.no_grad()
def update(st: InPlaceState, rule: UpdateRule, items: torch.Tensor | None, z: torch.Tensor, x0: torch.Tensor,
           done: torch.Tensor | None = None, host: bool = False, back: int = 0) -> None:
    """W_b += lr · clip(V̂ᵀ Z) for the streams `items` (None: all) from their (possibly partial) chunk,
    restricted to `done` [N] when given. A non-finite Δ resets its stream to the run's initial weight and is
    counted; the warning comes when telemetry is read (SPEC §3.7). The one-token step path is tensor
    arithmetic only; `host` (multi-token calls, which may read the device) skips the masking passes over
    the [N, d, h] Δ when every Δ is finite, the common case. `back`: positions of the current call after
    this chunk (where the update series places its row).

    Args:
        z: [N, L, h] the chunk's hidden activations; x0: [N, L, d] its token embeddings.
    """
    v = rule.target(x0, folded=host)  # [N, L, d]; host calls are never captured: the cached fold may serve
    delta = torch.bmm(v.transpose(1, 2), z)  # [N, d, h]
    # The norm serves the clip and the non-finite guard: a non-finite (or overflowing) Δ norm
    # is the only way W can become non-finite, so W itself is never re-scanned.
    norm = torch.linalg.vector_norm(delta, dim=(1, 2))  # [N]
    finite = torch.isfinite(norm)
    apply = finite if done is None else finite & done
    bad = ~finite if done is None else done & ~finite
    clipped = torch.zeros_like(apply)
    scale = None
    if rule.clip is not None:
        scale = (rule.clip / (norm + rule.clip_eps)).clamp(max=1.0)
        delta.mul_(scale[:, None, None])
        clipped = apply & (scale < 1.0)
    masked = not (host and done is None and bool(finite.all()))  # one read per chunk, off the step path
    if masked:
        delta.masked_fill_(~apply[:, None, None], 0.0)
    rec = st.recorder if st.recorder is not None and not st.recorder.paused else None
    before = (st.w if items is None else st.w[items]).clone() if rec is not None else None
    if items is None:
        st.w.add_(delta, alpha=rule.lr)
        if masked:
            torch.where(bad[:, None, None], st.w_reset, st.w, out=st.w)
    else:  # only the N streams' weights are read and written (SPEC §8.9: the cost of the completing streams)
        st.w.index_add_(0, items, delta, alpha=rule.lr)
        if masked:
            st.w.index_copy_(0, items, torch.where(bad[:, None, None], st.w_reset, st.w[items]))
    for count, events in ((st.updates, apply), (st.clip_events, clipped), (st.nonfinite_events, bad)):
        if items is None:
            count.add_(events.long())
        else:
            count.index_add_(0, items, events.long())
    if rec is not None:
        _record_update(st, rec, rule.w0, items, done, before, norm, scale, finite, z.shape[1], back)


def _record_update(st: InPlaceState, rec: UpdateRecorder, w0: torch.Tensor, items: torch.Tensor | None,
                   done: torch.Tensor | None, before: torch.Tensor, norm: torch.Tensor,
                   scale: torch.Tensor | None, finite: torch.Tensor, tokens: int, back: int) -> None:
    """The update series' rows of the streams `items` (None: all) that completed (`done`, None: all):
    device arithmetic only, no host read."""
    B, dev = st.batch_size, st.w.device
    after = st.w if items is None else st.w[items]  # [N, d, h]
    sq = squared_norms({"w": after}, {"w": before}, {"w": w0})

    def full(v: torch.Tensor, fill: float = 0.0) -> torch.Tensor:  # [N] -> [B]
        if items is None:
            return v
        return torch.full((B,), fill, dtype=v.dtype, device=dev).index_copy_(0, items, v)
    sel = torch.ones_like(finite) if done is None else done  # [N]
    rec.record(0, full(sel, False), back, tokens, *(full(v) for v in sq), delta_sq=full(norm.double().square()),
               clip_scale=1.0 if scale is None else full(scale, 1.0), nonfinite=full(~finite, False))
