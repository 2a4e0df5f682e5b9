"""In-Place TTT: the gated MLP whose down projection is a per-stream fast weight (SPEC §3)."""

from __future__ import annotations

import contextlib
import typing as tp
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from moshi.modules.gating import ActivationGating, gating_forward_kernel
from moshi.modules.lora import LoRALinear
from moshi.utils.compile import no_compile
from moshi.modules.streaming import State

from .config import TTTConfig
from ..errors import StateMismatchError
from .interface import FastWeightLayer, HostClock, keep_float32, refuse_graph_capture
from .recording import UpdateRecorder, squared_norms

F32 = torch.float32
# `activation` of the `ttt` section: "gelu" is exact (erf) GELU, what the fine-tuning fork's TTT layers use.
ACTIVATIONS: dict[str, tp.Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "silu": F.silu}


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The effective weight of a moshi linear (plain or LoRA-wrapped)."""
    if isinstance(m, LoRALinear):
        return m.merge_weight()
    return m.weight


class ChunkConv1d(nn.Module):
    """Conv1D over the time axis of *one chunk*, zero-padded inside the chunk only (SPEC §3.2)."""

    def __init__(self, dim: int, kernel_size: int, padding: str):
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = padding
        self.conv = nn.Conv1d(dim, dim, kernel_size, bias=False, dtype=F32)

    def pads(self) -> tuple[int, int]:
        k = self.kernel_size
        left = 0 if self.padding == "right" else (k - 1) // 2
        return left, k - 1 - left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, L, d], each row one chunk (or the completed prefix of one). Padding here, never
        # across rows, is what keeps a chunk's target from seeing the next chunk (pitfall 1).
        y = F.conv1d(F.pad(x.transpose(1, 2), self.pads()), self.conv.weight)  # [N, d, L]
        return y.transpose(1, 2)


class TargetGenerator(nn.Module):
    """V̂ = Conv1D_K(X0 of one chunk) · W_targetᵀ."""

    def __init__(self, dim: int, kernel_size: int, padding: str):
        super().__init__()
        self.conv1d = ChunkConv1d(dim, kernel_size, padding)
        self.W_target = nn.Linear(dim, dim, bias=False, dtype=F32)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return F.linear(self.conv1d(x0), self.W_target.weight)  # [N, L, d]

    @torch.no_grad()
    def init_ntp(self) -> None:
        """Training-free next-token target: V̂_t = X0_{t+1} inside the chunk, 0 on its last row."""
        k = self.conv1d.kernel_size
        tap = 1 if self.conv1d.padding == "right" else (k - 1) // 2 + 1
        if tap >= k or (self.conv1d.padding == "center" and k < 3):
            raise ValueError(f"ntp init needs a tap reading t+1: kernel {k} with "
                             f"{self.conv1d.padding} padding has none (center needs K >= 3).")
        d = self.W_target.weight.shape[0]
        eye = torch.eye(d, dtype=F32, device=self.W_target.weight.device)
        self.conv1d.conv.weight.zero_()
        self.conv1d.conv.weight[:, :, tap] = eye
        self.W_target.weight.copy_(eye)

    @torch.no_grad()
    def init_zero(self) -> None:
        """The fork's warm start: W_target = 0, so TTT has no effect until trained; conv = 0 too."""
        self.conv1d.conv.weight.zero_()
        self.W_target.weight.zero_()


class X0Source:
    """Per-LM holder of the current call's token embeddings, filled by forward hooks.

    `input`: the sum of the token embeddings (audio and text, no condition); `text`: `lm.text_emb`'s output.
    """

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.handles: list[tp.Any] = []

    def get(self, source: str, B: int, T: int) -> torch.Tensor:
        x0 = self.input if source == "input" else self.text
        if x0 is None or x0.shape[:2] != (B, T):
            raise RuntimeError("In-Place TTT layer called without its token embeddings: "
                               "call it through lm.forward_text / LMGen, not on its own.")
        return x0


def _counter(batch_size: int, device) -> torch.Tensor:
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


class InPlaceTTTGating(FastWeightLayer[InPlaceState]):
    """Drop-in replacement of moshi's `ActivationGating` with an In-Place TTT down projection.

    Args:
        linear_in: moshi's `linear_in` (slow W_gate, W_up; plain or LoRA), reused as is.
        linear_out: moshi's `linear_out`, kept so moshi's own state dict still loads; unused.
        activation: moshi's gating activation.
        cfg: the resolved `ttt` section.
        x0: the LM's `X0Source`.
    """

    variant = "inplace"
    structural = frozenset({"variant", "layers", *TTTConfig.structural_keys})

    def __init__(self, linear_in: nn.Module, linear_out: nn.Module, activation, cfg: TTTConfig,
                 x0: X0Source):
        super().__init__()
        self.linear_in = linear_in
        self.linear_out = linear_out
        self.activation = ACTIVATIONS[cfg.activation] if cfg.activation is not None else activation
        self.activation_name = cfg.activation
        w_out = linear_weight(linear_out)
        d, h = w_out.shape
        self.dim, self.hidden = d, h
        self.register_buffer("w_down", w_out.detach().to(F32).clone())  # [d, h] W0
        self.target_generator = TargetGenerator(d, cfg.conv_kernel_size, cfg.conv_padding)
        self.target_generator.to(w_out.device)
        self.chunk_size = cfg.chunk_size
        self.lr = cfg.lr
        self.clip = cfg.delta_clip_fro_norm
        self.clip_eps = cfg.delta_clip_epsilon
        self.target_source = cfg.target_source
        self._x0 = x0
        self._warm_start: torch.Tensor | None = None  # [d, h] replaces W0 as the reset target
        self._w_cast: tuple | None = None  # (reset target, its version/device/dtype, its model-dtype copy)

    # -- keep fast-weight tensors float32 whatever dtype the LM is moved to ------------------
    def _apply(self, fn, recurse=True):
        fast = (self, self.target_generator.conv1d.conv, self.target_generator.W_target)
        keep_float32(fast, lambda: super(InPlaceTTTGating, self)._apply(fn, recurse))
        return self

    @property
    def frozen(self) -> bool:
        return self.lr == 0.0

    def set_warm_start(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Resets (and new streams) start from `tensors["w"]` [d, h] instead of W0; None undoes it.
        A snapshot's pending chunk is not replayed: chunk counting restarts at a reset (SPEC §6)."""
        if tensors is None:
            self._warm_start = None
            return
        w = tensors["w"]
        if tuple(w.shape) != (self.dim, self.hidden):
            raise StateMismatchError(f"warm-start weight has shape {tuple(w.shape)}, "
                                     f"the layer needs {(self.dim, self.hidden)}.")
        self._warm_start = w.to(self.w_down.device, F32).clone()

    def _reset_target(self) -> torch.Tensor:
        return self.w_down if self._warm_start is None else self._warm_start

    def _init_streaming_state(self, batch_size: int) -> InPlaceState:
        dev = self.w_down.device
        n = batch_size
        st = InPlaceState(batch_size, dev, clock=HostClock.fresh(self.chunk_size, n))
        st.count, st.tokens, st.updates, st.resets = (_counter(n, dev) for _ in range(4))
        st.clip_events, st.nonfinite_events = _counter(n, dev), _counter(n, dev)
        st.rows = torch.arange(n, device=dev) * self.chunk_size
        st.w_reset = self._reset_target()
        if not self.frozen:
            st.w = st.w_reset.expand(n, -1, -1).clone()
            st.pending_z = torch.zeros(n, self.chunk_size, self.hidden, device=dev, dtype=F32)
            st.pending_x0 = torch.zeros(n, self.chunk_size, self.dim, device=dev, dtype=F32)
            st.recorder = self.new_recorder(n, dev)
        return st

    # -- forward -----------------------------------------------------------------------------
    def hidden_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Z = act(x W_gateᵀ) ⊙ (x W_upᵀ), through moshi's own `linear_in`."""
        hu = self.linear_in(x)  # [B, T, 2h]
        B, T, _ = hu.shape
        hu = hu.view(B, T, 2, -1)
        return self.activation(hu[..., 0, :]) * hu[..., 1, :]  # [B, T, h]

    def _frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The reset target cast to the model dtype, cached until it changes (in place or replaced)."""
        w = self._reset_target()
        c = self._w_cast
        if c is None or c[0] is not w or c[1] != (w._version, w.device, dtype):
            c = self._w_cast = (w, (w._version, w.device, dtype), w.to(dtype))
        return c[2]

    def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """TTT off: moshi's gating computation in the model dtype with W0 as the down projection (SPEC
        §3.4b). A plain `linear_in` goes through moshi's own gating kernel, compiled or not as moshi's
        module would be, so that bf16 runs give what moshi's CLI gives, on CPU and GPU alike."""
        w = self._frozen_weight(x.dtype)
        if type(self.linear_in) is nn.Linear:
            with contextlib.ExitStack() as stack:
                if self.training:
                    stack.enter_context(no_compile())
                return gating_forward_kernel(self.linear_in.weight, w, self.activation, x)
        return F.linear(self.hidden_activations(x), w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.frozen:
            return self._frozen_forward(x)
        z = self.hidden_activations(x).to(F32)  # [B, T, h]
        x0 = self._x0.get(self.target_source, B, T).to(F32)  # [B, T, d]
        state = self._streaming_state
        if state is None:  # plain forward (scoring): every call starts from W0
            state = self._init_streaming_state(B)
            state.recorder = None
        else:
            if state.recorder is not None:  # the update series' positions (device side; host half outside graphs)
                state.recorder.advance(0, state.exec_mask, T)
            if T == 1:  # LMGen.step: the graph-safe one-token step
                refuse_graph_capture(x, planned=state.clock.planned is not None)
                return self._step_one(state, z, x0, state.clock.take()).to(x.dtype)
        refuse_graph_capture(x)
        return self._run(state, z, x0).to(x.dtype)

    def _step_one(self, st: InPlaceState, z: torch.Tensor, x0: torch.Tensor, completes: bool) -> torch.Tensor:
        """One token of every stream as tensor arithmetic only (SPEC §8.6): apply W, write the token's pending
        row, count the live streams, and, when the host clock says a live stream's chunk completes (`completes`), the
        masked update of the streams whose count reached C. Nothing is read back to the host."""
        B, C = st.batch_size, self.chunk_size
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
        if completes:
            done = live & (st.count == C)  # [B]
            self._update(st, None, st.pending_z, st.pending_x0, done)
            st.count.masked_fill_(done, 0)
        return out

    def _run(self, st: InPlaceState, z: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Apply-then-update over T tokens, in segments that end where some stream's chunk ends."""
        B, T, _ = z.shape
        C = self.chunk_size
        outs = []
        t = 0
        live = [b for b in range(B) if st.clock.active[b]]
        while t < T:
            L = min([T - t] + [C - st.n_pending[b] for b in live])
            zs, xs = z[:, t:t + L], x0[:, t:t + L]
            outs.append(torch.bmm(zs, st.w.transpose(1, 2)))  # [B, L, d] with each stream's W
            synced = len(live) == B and len({st.n_pending[b] for b in live}) == 1
            if synced and st.n_pending[0] == 0 and L == C:
                self._update(st, None, zs, xs, host=True, back=T - t - L)  # whole chunk in hand: no buffering
            else:
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
                done = [b for b in live if st.n_pending[b] == C]
                if done:
                    ix = torch.tensor(done, device=z.device)
                    self._update(st, ix, st.pending_z[ix], st.pending_x0[ix], host=True, back=T - t - L)
                for b in done:
                    st.n_pending[b] = 0
            t += L
        st.tokens.add_(st.exec_mask.long() * T)
        st.count.copy_(torch.tensor(st.n_pending))  # host to device: the clock is the truth
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    @torch.no_grad()
    def _update(self, st: InPlaceState, items: torch.Tensor | None, z: torch.Tensor, x0: torch.Tensor,
                done: torch.Tensor | None = None, host: bool = False, back: int = 0) -> None:
        """W_b += lr · clip(V̂ᵀ Z) for the streams `items` (None: all) from their (possibly partial) chunk,
        restricted to `done` [N] when given. A non-finite Δ resets its stream to the run's initial weight and is
        counted; the warning comes when telemetry is read (SPEC §3.7). The one-token step path is tensor
        arithmetic only; `host` (multi-token calls, which may read the device) skips the masking passes over
        the [N, d, h] Δ when every Δ is finite, the common case. `back`: positions of the current call after
        this chunk (where the update series places its row)."""
        v = self.target_generator(x0)  # [N, L, d]
        delta = torch.bmm(v.transpose(1, 2), z)  # [N, d, h]
        # The norm serves the clip and the non-finite guard: a non-finite (or overflowing) Δ norm
        # is the only way W can become non-finite, so W itself is never re-scanned.
        norm = torch.linalg.vector_norm(delta, dim=(1, 2))  # [N]
        finite = torch.isfinite(norm)
        apply = finite if done is None else finite & done
        bad = ~finite if done is None else done & ~finite
        clipped = torch.zeros_like(apply)
        scale = None
        if self.clip is not None:
            scale = (self.clip / (norm + self.clip_eps)).clamp(max=1.0)
            delta.mul_(scale[:, None, None])
            clipped = apply & (scale < 1.0)
        masked = not (host and done is None and bool(finite.all()))  # one read per chunk, off the step path
        if masked:
            delta.masked_fill_(~apply[:, None, None], 0.0)
        rec = st.recorder if st.recorder is not None and not st.recorder.paused else None
        before = (st.w if items is None else st.w[items]).clone() if rec is not None else None
        if items is None:
            st.w.add_(delta, alpha=self.lr)
            bad_all = bad
        else:
            st.w.index_add_(0, items, delta, alpha=self.lr)
            bad_all = torch.zeros(st.batch_size, dtype=torch.bool, device=bad.device).index_copy(0, items, bad)
        if masked:
            torch.where(bad_all[:, None, None], st.w_reset, st.w, out=st.w)
        for counter, events in ((st.updates, apply), (st.clip_events, clipped), (st.nonfinite_events, bad)):
            if items is None:
                counter.add_(events.long())
            else:
                counter.index_add_(0, items, events.long())
        if rec is not None:
            self._record_update(st, rec, items, done, before, norm, scale, finite, z.shape[1], back)

    def _record_update(self, st: InPlaceState, rec: UpdateRecorder, items: torch.Tensor | None,
                       done: torch.Tensor | None, before: torch.Tensor, norm: torch.Tensor,
                       scale: torch.Tensor | None, finite: torch.Tensor, tokens: int, back: int) -> None:
        """The update series' rows of the streams `items` (None: all) that completed (`done`, None: all):
        device arithmetic only, no host read."""
        B, dev = st.batch_size, st.w.device
        after = st.w if items is None else st.w[items]  # [N, d, h]
        sq = squared_norms({"w": after}, {"w": before}, {"w": self.w_down})

        def full(v: torch.Tensor, fill: float = 0.0) -> torch.Tensor:  # [N] -> [B]
            if items is None:
                return v
            return torch.full((B,), fill, dtype=v.dtype, device=dev).index_copy_(0, items, v)
        sel = torch.ones_like(finite) if done is None else done  # [N]
        rec.record(0, full(sel, False), back, tokens, *(full(v) for v in sq), delta_sq=full(norm.double().square()),
                   clip_scale=1.0 if scale is None else full(scale, 1.0), nonfinite=full(~finite, False))

    # -- FastWeightLayer interface -------------------------------------------------------------
    def capture(self, batch_index: int) -> dict[str, torch.Tensor]:
        st = self._state()
        n = st.n_pending[batch_index]
        if st.w is None:
            w = st.w_reset
            pz = torch.zeros(0, self.hidden)
            px = torch.zeros(0, self.dim)
        else:
            w = st.w[batch_index]
            pz, px = st.pending_z[batch_index, :n], st.pending_x0[batch_index, :n]
        return {"w": w.detach().to("cpu", F32).clone(), "pending_z": pz.detach().to("cpu", F32).clone(),
                "pending_x0": px.detach().to("cpu", F32).clone()}

    def restore(self, tensors: dict[str, torch.Tensor], batch_index: int) -> None:
        st = self._state()
        w, pz, px = tensors["w"], tensors["pending_z"], tensors["pending_x0"]
        n = pz.shape[0]
        if tuple(w.shape) != (self.dim, self.hidden):
            raise StateMismatchError(f"fast weight has shape {tuple(w.shape)}, the layer's is {(self.dim, self.hidden)}.")
        if pz.shape != (n, self.hidden) or px.shape != (n, self.dim):
            raise StateMismatchError(f"pending chunk shapes {tuple(pz.shape)} / {tuple(px.shape)} do not "
                                     f"match hidden {self.hidden} / dim {self.dim}.")
        if n >= self.chunk_size:
            raise StateMismatchError(f"{n} pending tokens do not fit chunk_size {self.chunk_size}.")
        if st.w is None:
            if n or not torch.equal(w.to(st.w_reset), st.w_reset):
                raise StateMismatchError("this model runs with TTT off (lr = 0): its fast weights are frozen "
                                         "at W0 and cannot take a snapshot that moved away from them.")
            return
        dev = st.w.device
        st.w[batch_index] = w.to(dev, F32)
        st.pending_z[batch_index, :n] = pz.to(dev, F32)
        st.pending_x0[batch_index, :n] = px.to(dev, F32)
        st.n_pending[batch_index] = n
        st.count[batch_index] = n

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        return {"w_down": self.w_down}

    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        return {"w_down": self.w_down, "target_generator.conv1d.conv.weight": self.target_generator.conv1d.conv.weight,
                "target_generator.W_target.weight": self.target_generator.W_target.weight}

    def telemetry(self, batch_index: int) -> dict[str, tp.Any]:
        st = self._state()
        b = batch_index
        w0 = self.w_down
        w = st.w[b] if st.w is not None else st.w_reset
        drift = (torch.linalg.vector_norm(w - w0) / torch.linalg.vector_norm(w0).clamp_min(1e-30)).item()
        self._warn_nonfinite(st.nonfinite_events.tolist())
        return {"tokens": int(st.tokens[b]), "updates": int(st.updates[b]), "resets": int(st.resets[b]),
                "clip_events": int(st.clip_events[b]), "nonfinite_events": int(st.nonfinite_events[b]),
                "pending_tokens": st.n_pending[b], "relative_drift": drift}

    def host_clocks(self) -> list[HostClock]:
        st = self._streaming_state
        return [] if st is None or st.w is None else [st.clock]

    def config_section(self) -> dict[str, tp.Any]:
        conv = self.target_generator.conv1d
        return {"variant": self.variant, "chunk_size": self.chunk_size, "lr": self.lr,
                "conv_kernel_size": conv.kernel_size, "conv_padding": conv.padding,
                "target_source": self.target_source, "activation": self.activation_name,
                "delta_clip_fro_norm": self.clip,
                "delta_clip_epsilon": self.clip_eps}

    def state_bytes_per_stream(self) -> int:
        if self.frozen:
            return 0
        return 4 * (self.dim * self.hidden + self.chunk_size * (self.dim + self.hidden))

    def bytes_read_per_step(self) -> int:
        return 0 if self.frozen else 4 * self.dim * self.hidden  # W; the pending chunk is written, not read

    def memory_formula(self) -> str:
        if self.frozen:
            return "0 (frozen)"
        return f"({self.dim}x{self.hidden} + {self.chunk_size}x({self.hidden}+{self.dim}))x4"

    def forwards_vs_plain(self, tokens: int, generator: torch.Generator
                          ) -> tuple[tp.Callable[[], tp.Any], tp.Callable[[], tp.Any], str]:
        """This layer vs moshi's `ActivationGating` with the same slow weights, on `tokens` tokens."""
        plain = ActivationGating(self.dim, 4 * self.dim, self.activation)
        plain.linear_in, plain.linear_out = self.linear_in, self.linear_out
        w = next(self.linear_in.parameters())
        x = torch.randn(1, tokens, self.dim, generator=generator).to(w.device, w.dtype)  # [1, T, d]
        x0 = torch.randn(1, tokens, self.dim, generator=generator).to(w.device, w.dtype)  # [1, T, d]: the target's input

        def ttt():
            self._x0.input = x0
            try:
                return self(x)
            finally:
                self._x0.input = None
        return ttt, lambda: plain(x), "In-Place TTT gating vs moshi ActivationGating"

    def macs_vs_plain(self, tokens: int) -> tuple[float, str]:
        d, h, k = self.dim, self.hidden, self.target_generator.conv1d.kernel_size
        # MACs per token: plain = gate+up (2hd) + down (hd); TTT adds Δ = V̂ᵀZ (hd) and the target ((K+1)d²).
        return (4 * h * d + (k + 1) * d * d) / (3 * h * d), f"(4hd + (K+1)d²) / 3hd (d={d}, h={h}, K={k})"

    @torch.no_grad()
    def flush_partial(self, batch_index: int | None = None) -> None:
        st = self._state()
        if st.w is None:
            return
        items = range(st.batch_size) if batch_index is None else [batch_index]
        if st.recorder is not None:
            st.recorder.expect_flush()
        for b in items:
            n = st.n_pending[b]
            if n:
                ix = torch.tensor([b], device=st.w.device)
                self._update(st, ix, st.pending_z[b:b + 1, :n], st.pending_x0[b:b + 1, :n], host=True)
                st.n_pending[b] = 0
                st.count[b] = 0
