"""What the variants built on the ttt-lm learner share: per-stream state, reset, warm start, snapshots, telemetry."""

from __future__ import annotations

import abc
import math
import typing as tp
from dataclasses import dataclass, field

import torch
from torch import nn

from moshi.modules.streaming import State

from ..errors import CheckpointError, StateMismatchError
from .interface import DerivedTensor, FastWeightLayer, HostClock, keep_float32, refuse_graph_capture
from .learner import F32, Norm, flush, frozen_outputs, learn
from .learner_state import LearnerState
from .learner_token import TokenInputs
from .recording import LearnerTap, UpdateRecorder

PENDING_SUM = "pending_sum."
PENDING_COUNT = "pending_count"
COUNTERS = 5  # count, tokens, updates, resets, nonfinite: int64 each, per stream and learner


class Float32Module(nn.Module):
    """Keeps its parameters and buffers float32 whatever dtype the LM is moved to (SPEC §3.9)."""

    def _apply(self, fn, recurse=True):
        keep_float32(list(self.modules()), lambda: super(Float32Module, self)._apply(fn, recurse))
        return self


class Derived:
    """A value made from parameters by `make(parts, *extra)`, made again only when a part or `extra` changed
    (`DerivedTensor`). A forward that trains, or one torch.compile traces, gets it made fresh (no storage
    addresses in a traced graph)."""

    def __init__(self, make: tp.Callable[..., tp.Any]) -> None:
        self._make = make
        self._cache = DerivedTensor()

    def __call__(self, parts: tp.Sequence[torch.Tensor], *extra: tp.Hashable) -> tp.Any:
        """The value for `parts` as they are now and `extra` (hashable constants `make` also takes)."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in parts)):
            return self._make(list(parts), *extra)
        return self._cache.get(parts, lambda: self._make([t.detach() for t in parts], *extra), *extra)


class StackedWeights(Derived):
    """[w1; w2; ...]: parameters stacked along dim 0 so that several projections of one input are one product."""

    def __init__(self) -> None:
        super().__init__(lambda parts: torch.cat(parts, 0))


class TransposedWeights(Derived):
    """[w1; w2; ...]ᵀ kept contiguous [in, out], for `linear_t`."""

    def __init__(self) -> None:
        super().__init__(lambda parts: torch.cat(parts, 0).t().contiguous())


def linear_t(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x·W + b for x [..., in] and W stored [in, out] (`TransposedWeights`): F.linear's value. At batch 1 the product
    is a matrix-vector one whose time is reading the weight from memory, and in this layout it reads faster on CPU
    (cold caches, 2 cores: [1544, 512] 371 → 219 µs, [512, 512] 163 → 128 µs; docs/design.md)."""
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w_t).view(*x.shape[:-1], w_t.shape[1])


@dataclass
class Learner:
    """One learner of a layer: its θ0 parameters, LayerNorm (γ, β) and inner model."""

    theta0: dict[str, torch.Tensor]  # {W1, b1, (W2, b2)}: [H, ...]
    gamma: torch.Tensor              # [H, p]
    beta: torch.Tensor               # [H, p]
    inner: str                       # linear | mlp


class Norms:
    """Each learner's `Norm` by name, made again only when its γ or β changed."""

    def __init__(self) -> None:
        self._by_name: dict[str, Derived] = {}

    def __call__(self, name: str, lrn: Learner) -> Norm:
        if name not in self._by_name:
            self._by_name[name] = Derived(lambda gb: Norm.of(*gb))
        return self._by_name[name]([lrn.gamma, lrn.beta])


@dataclass
class LearnerLayerState(State):
    """Per stream, for each learner of the layer: θ_start, pending gradient sums and counters (all tensors)."""

    learners: dict[str, LearnerState] = field(default_factory=dict)
    start: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # what a reset restores
    clocks: dict[str, HostClock] = field(default_factory=dict)  # host mirrors of the pending counts
    frozen: bool = False  # rate 0: θ stays at `start`, the learners hold counters only
    recorder: UpdateRecorder | None = None  # the update series (SPEC §3.7), when recording

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        mask = [bool(v) for v in reset_mask.tolist()]  # the host issued it: reading it back is no step sync
        for name, st in self.learners.items():
            st.reset(reset_mask, self.start[name])
            self.clocks[name].reset(mask)
        if self.recorder is not None:
            self.recorder.record_reset(reset_mask)

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        super().set_exec_mask(exec_mask)
        active = [bool(v) for v in exec_mask.tolist()]
        for clock in self.clocks.values():
            clock.active = list(active)

    @classmethod
    def fresh(cls, start: dict[str, dict[str, torch.Tensor]], batch_size: int, device: torch.device,
              chunk_size: int, frozen: bool) -> "LearnerLayerState":
        """New streams of learners that start from (and reset to) `start` {learner: θ}."""
        st = cls(batch_size, device, frozen=frozen)
        for name, theta in start.items():
            st.start[name] = theta
            st.learners[name] = LearnerState.fresh({} if frozen else theta, batch_size, device)
            st.clocks[name] = HostClock.fresh(chunk_size, batch_size)
        return st

    def tap(self, name: str, theta0: dict[str, torch.Tensor]) -> LearnerTap:
        """Learner `name`'s part of the update series (the recorder must be set); `theta0`: its θ0."""
        return LearnerTap(self.recorder, list(self.learners).index(name), theta0)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


class LearnerLayer(FastWeightLayer[LearnerLayerState], Float32Module):
    """Base of the `mlp` and `linear-adapter` variants; subclasses define `learners()`, the forward and the rest
    of the interface that depends on their shape.

    Snapshot names per learner `n` (empty for a layer with one learner): `{n.}W1` ... (θ_start),
    `{n.}pending_sum.W1` ... (Σ η_s ∇ℓ_s of the pending tokens) and `{n.}pending_count`.
    """

    chunk_size: int
    bypass: bool = False  # `ttt bench`'s plain layer: the variant adds nothing and computes nothing

    def __init__(self) -> None:
        super().__init__()
        self._warm: dict[str, dict[str, torch.Tensor]] | None = None
        self.norms = Norms()

    @abc.abstractmethod
    def learners(self) -> dict[str, Learner]:
        """The layer's learners by name (snapshot prefix)."""

    def learner(self, name: str) -> Learner:
        """Learner `name` alone (what a call needs; a layer with several learners builds just this one)."""
        return self.learners()[name]

    @property
    def frozen(self) -> bool:
        return self.get_rate() == 0.0

    def _device(self) -> torch.device:
        return next(iter(next(iter(self.learners().values())).theta0.values())).device

    def start_theta(self, name: str) -> dict[str, torch.Tensor]:
        """What streams start from and reset to: θ0, or the warm start."""
        if self._warm is not None:
            return self._warm[name]
        return {k: v.detach() for k, v in self.learners()[name].theta0.items()}

    def _init_streaming_state(self, batch_size: int) -> LearnerLayerState:
        start = {name: self.start_theta(name) for name in self.learners()}
        st = LearnerLayerState.fresh(start, batch_size, self._device(), self.chunk_size, self.frozen)
        st.recorder = self.new_recorder(batch_size, st.device, parts=len(st.learners))
        return st

    def _tap(self, st: LearnerLayerState, name: str) -> LearnerTap | None:
        """Learner `name`'s part of the layer's update series (None when not recording)."""
        return None if st.recorder is None else st.tap(name, self.learners()[name].theta0)

    def run_learner(self, name: str, q: torch.Tensor,
                    keys: tp.Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
                    token: tp.Callable[[], TokenInputs] | None = None) -> torch.Tensor:
        """o [B,H,T,p] of learner `name` for this call, in the stream's state (a fresh one outside streaming).

        Args:
            q: queries [B,H,T,p] float32.
            keys: makes (keys [B,H,T,p], targets [B,H,T,p], η [B,H,T]); not called when frozen or when `token` is.
            token: for T = 1 of a one-head linear learner, makes the token's `TokenInputs` (its own layout).
        """
        lrn = self.learner(name)
        norm = self.norms(name, lrn)
        st = self._streaming_state
        if st is None:
            st = self._init_streaming_state(q.shape[0])
            st.recorder = None
        lst = st.learners[name]
        tap = self._tap(st, name)
        if tap is not None:
            tap.recorder.advance(tap.part, st.exec_mask, q.shape[2])
        if st.frozen:
            lst.tokens.add_(st.exec_mask.long() * q.shape[2])
            return frozen_outputs(lrn.inner, st.start[name], q, norm)
        clock = st.clocks[name]
        refuse_graph_capture(q, planned=q.shape[2] == 1 and clock.planned is not None)
        tok = token() if token is not None and q.shape[2] == 1 else None
        k, y, eta = keys() if tok is None else (None, None, None)
        return learn(lst, lrn.inner, q, k, y, eta, lrn.gamma, lrn.beta, self.chunk_size, st.exec_mask,
                     st.start[name], clock, tap, norm, tok)

    # -- snapshots ---------------------------------------------------------------------------------
    def capture(self, batch_index: int) -> dict[str, torch.Tensor]:
        st = self._state()
        out: dict[str, torch.Tensor] = {}
        for name, lst in st.learners.items():
            pre = _prefix(name)
            for k, v0 in st.start[name].items():
                theta = v0 if st.frozen else lst.theta[k][batch_index]
                pend = torch.zeros_like(v0) if st.frozen else lst.sums[k][batch_index]
                out[pre + k] = theta.detach().to("cpu", F32).clone()
                out[pre + PENDING_SUM + k] = pend.detach().to("cpu", F32).clone()
            out[pre + PENDING_COUNT] = lst.count[batch_index].detach().to("cpu", F32).clone()
        return out

    def restore(self, tensors: dict[str, torch.Tensor], batch_index: int) -> None:
        st = self._state()
        parts = split_snapshot(self.learners(), tensors, self.variant, self.chunk_size)
        if st.frozen:
            moved = any(int(float(own[PENDING_COUNT])) or not all(
                torch.equal(own[k].to(st.start[name][k]), st.start[name][k]) for k in st.start[name])
                for name, own in parts.items())
            if moved:
                raise StateMismatchError("this model runs with TTT off (rate 0): its fast weights are frozen at "
                                         "their initial value and cannot take a snapshot that moved away from it.")
            return
        for name, own in parts.items():
            lst = st.learners[name]
            for k in lst.theta:
                lst.theta[k][batch_index] = own[k].to(lst.theta[k])
                lst.sums[k][batch_index] = own[PENDING_SUM + k].to(lst.sums[k])
            lst.count[batch_index] = int(float(own[PENDING_COUNT]))
            st.clocks[name].pending[batch_index] = int(float(own[PENDING_COUNT]))

    def set_warm_start(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Resets (and new streams) start from a snapshot's θ (its pending sums are not replayed)."""
        if tensors is None:
            self._warm = None
            return
        parts = split_snapshot(self.learners(), tensors, self.variant)
        dev = self._device()
        self._warm = {name: {k: v.to(dev, F32).clone() for k, v in own.items()} for name, own in parts.items()}

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        return {_prefix(n) + k: v for n, lrn in self.learners().items() for k, v in lrn.theta0.items()}

    # -- telemetry, memory -------------------------------------------------------------------------
    def telemetry(self, batch_index: int) -> dict[str, tp.Any]:
        st = self._state()
        self._warn_nonfinite([int(v) for v in sum(lst.nonfinite for lst in st.learners.values()).tolist()])
        return stream_telemetry(st, self.learners(), batch_index)

    def host_clocks(self) -> list[HostClock]:
        st = self._streaming_state
        return [] if st is None or st.frozen else list(st.clocks.values())

    def state_bytes_per_stream(self) -> int:
        n = len(self.learners())
        counters = 8 * COUNTERS * n
        return counters if self.frozen else 4 * 2 * theta_numel(self.learners()) + counters

    def memory_formula(self) -> str:
        """2·|θ|·4 (θ_start and the pending gradient sums, float32) + learners·5·8 (int64 counters)."""
        n = len(self.learners())
        if self.frozen:
            return f"{n}x{COUNTERS}x8"
        return f"2x{theta_numel(self.learners())}x4 + {n}x{COUNTERS}x8"

    @torch.no_grad()
    def flush_partial(self, batch_index: int | None = None) -> None:
        st = self._state()
        if st.frozen:
            return
        streams = torch.ones(st.batch_size, dtype=torch.bool, device=st.device)
        if batch_index is not None:
            streams = torch.arange(st.batch_size, device=st.device) == batch_index
        if st.recorder is not None:
            st.recorder.expect_flush()
        for name, lst in st.learners.items():
            flush(lst, self.chunk_size, streams, st.start[name], self._tap(st, name))
            clock = st.clocks[name]
            clock.pending = [0 if batch_index in (None, b) else n for b, n in enumerate(clock.pending)]


# -- helpers for the variants' attach code and bench ---------------------------------------------------

@torch.no_grad()
def load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """Copies `tensors[prefix + name]` into the module's parameters (float32); returns the names it lacked.

    Raises CheckpointError naming the tensor for a wrong shape or non-finite values (SPEC §7.1).
    """
    missing = []
    for name, dst in list(module.named_parameters()) + list(module.named_buffers()):
        key = prefix + name
        if key not in tensors:
            missing.append(key)
            continue
        val = tensors[key]
        if tuple(val.shape) != tuple(dst.shape):
            raise CheckpointError(f"TTT tensor {key} has shape {list(val.shape)}, the layer needs {list(dst.shape)}.")
        if val.is_floating_point() and not torch.isfinite(val).all():
            raise CheckpointError(f"TTT tensor {key} holds NaN or infinite values.")
        dst.copy_(val.to(dst.device, F32))
    return missing


def plain_layer_macs(host: nn.Module, tokens: int) -> tuple[int, str]:
    """Multiply-accumulates per token of moshi's transformer layer (attention projections 4d², gated
    feed-forward 3dh, attention over the T keys its non-streaming forward computes 2dT)."""
    d = host.self_attn.embed_dim
    h = host.gating.linear_out.in_features
    return 4 * d * d + 3 * d * h + 2 * d * tokens, f"plain = 4d² + 3dh + 2dT (d={d}, h={h}, T={tokens})"


def time_bypassed(layer: LearnerLayer, fn: tp.Callable[[], tp.Any]) -> tp.Callable[[], tp.Any]:
    """`fn` run with the variant bypassed (the plain layer it extends)."""
    def run():
        layer.bypass = True
        try:
            return fn()
        finally:
            layer.bypass = False
    return run


def split_snapshot(learners: dict[str, Learner], tensors: dict[str, torch.Tensor], variant: str,
                   chunk_size: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A layer's snapshot tensors as {learner: {W1, ..., pending_sum.W1, ..., pending_count}}, names, shapes and
    pending counts checked against the learners. Without `chunk_size`: θ only, other tensors ignored (a warm start)."""
    pending = chunk_size is not None
    out: dict[str, dict[str, torch.Tensor]] = {}
    want: set[str] = set()
    for name, lrn in learners.items():
        pre = _prefix(name)
        own: dict[str, torch.Tensor] = {}
        names = list(lrn.theta0) + ([PENDING_SUM + k for k in lrn.theta0] + [PENDING_COUNT] if pending else [])
        for n in names:
            shape = () if n == PENDING_COUNT else tuple(lrn.theta0[n.removeprefix(PENDING_SUM)].shape)
            want.add(pre + n)
            if pre + n not in tensors:
                raise StateMismatchError(f"fast-weight tensor {pre + n} is missing ({variant} layer).")
            t = tensors[pre + n]
            if tuple(t.shape) != shape:
                raise StateMismatchError(f"fast-weight tensor {pre + n} has shape {list(t.shape)}, the layer "
                                         f"needs {list(shape)}.")
            own[n] = t
        out[name] = own
        n = float(own[PENDING_COUNT]) if pending else 0.0
        if not (n == int(n) and 0 <= n < (chunk_size or 1)):
            raise StateMismatchError(f"{pre}{PENDING_COUNT} = {n:g} does not fit chunk_size {chunk_size} "
                                     f"(0 .. {(chunk_size or 1) - 1} pending tokens).")
        if pending and n == 0 and any(torch.count_nonzero(v) for k, v in own.items() if k.startswith(PENDING_SUM)):
            raise StateMismatchError(f"{pre}pending_sum.* is not zero although no token is pending: an inconsistent "
                                     f"snapshot.")
    extra = sorted(set(tensors) - want) if pending else []
    if extra:
        raise StateMismatchError(f"unexpected fast-weight tensors {extra[:4]} for a {variant} layer.")
    return out


def theta_numel(learners: dict[str, Learner]) -> int:
    """|θ|: the numbers of every learner's θ0."""
    return sum(v.numel() for lrn in learners.values() for v in lrn.theta0.values())


def stream_telemetry(st: LearnerLayerState, learners: dict[str, Learner], b: int) -> dict[str, tp.Any]:
    """Stream b's counters (the interface's `telemetry`): the first learner's token and update counts, every
    learner's non-finite events, the drift over all of them."""
    first = next(iter(st.learners.values()))
    nonfinite = sum(int(lst.nonfinite[b]) for lst in st.learners.values())
    return {"tokens": int(first.tokens[b]), "updates": int(first.updates[b]), "resets": int(first.resets[b]),
            "clip_events": 0, "nonfinite_events": nonfinite, "pending_tokens": int(first.count[b]),
            "relative_drift": relative_drift(st, learners, b)}


def relative_drift(st: LearnerLayerState, learners: dict[str, Learner], b: int) -> float:
    """‖θ − θ0‖ / ‖θ0‖ of stream b over all of a layer's learners (float64 sums)."""
    d2 = n2 = 0.0
    for name, lst in st.learners.items():
        for k, v0 in learners[name].theta0.items():
            cur = st.start[name][k] if st.frozen else lst.theta[k][b]
            d2 += float((cur.double() - v0.double()).pow(2).sum())
            n2 += float(v0.double().pow(2).sum())
    return math.sqrt(d2) / max(math.sqrt(n2), 1e-30)
