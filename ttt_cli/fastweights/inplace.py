"""In-Place TTT: the gated MLP whose down projection is a per-stream fast weight (SPEC §3), and its tensor names."""

from __future__ import annotations

import contextlib
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from moshi.modules.gating import ActivationGating, gating_forward_kernel
from moshi.utils.compile import no_compile

from .config import TTTConfig
from ..errors import StateMismatchError
from .inplace_target import F32, TargetGenerator, X0Source, linear_weight
from .inplace_update import InPlaceState, UpdateRule, counter, flush, run_tokens, step_one
from .interface import DerivedTensor, FastWeightLayer, HostClock, keep_float32, refuse_graph_capture

# `activation` of the `ttt` section: "gelu" is exact (erf) GELU, what the fine-tuning fork's TTT layers use.
ACTIVATIONS: dict[str, tp.Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "silu": F.silu}

# The layer's checkpoint tensors (SPEC §4.2), the only place their names are spelled: layer i's sit under
# moshi's key of the gating module they replace, named as the layer's own buffer and parameters.
KEY_PREFIX = "transformer.layers.{i}.gating."
W0 = "w_down"                                   # θ0 [d, h]
TARGET_GENERATOR = "target_generator"           # the module V̂ comes from
W_TARGET = f"{TARGET_GENERATOR}.W_target"       # its projection (a module: the fork wraps it in LoRA)
TARGET_TENSORS = (f"{TARGET_GENERATOR}.conv1d.conv.weight", f"{W_TARGET}.weight")  # [d, d, K], [d, d]
TENSOR_NAMES = (W0, *TARGET_TENSORS)


def checkpoint_key(i: int, name: str) -> str:
    """The checkpoint key of tensor (or module) `name` of layer i's In-Place layer."""
    return KEY_PREFIX.format(i=i) + name


def tensor_shapes(dim: int, hidden: int, kernel: int) -> dict[str, tuple[int, ...]]:
    """The shape of each checkpoint tensor of a layer with model dimension d, hidden h and conv kernel K."""
    return dict(zip(TENSOR_NAMES, ((dim, hidden), (dim, dim, kernel), (dim, dim))))


class InPlaceGating(FastWeightLayer[InPlaceState]):
    """Drop-in replacement of moshi's `ActivationGating` with an In-Place TTT down projection: its computation
    (TTT on and off, one token or many, the streams' state). `InPlaceTTTGating` adds what commands ask of it.

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
        self._w_cast = DerivedTensor()  # the reset target in the model dtype

    # -- keep fast-weight tensors float32 whatever dtype the LM is moved to ------------------
    def _apply(self, fn, recurse=True):
        fast = (self, self.target_generator.conv1d.conv, self.target_generator.W_target)
        keep_float32(fast, lambda: super(InPlaceGating, self)._apply(fn, recurse))
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
        st.count, st.tokens, st.updates, st.resets = (counter(n, dev) for _ in range(4))
        st.clip_events, st.nonfinite_events = counter(n, dev), counter(n, dev)
        st.rows = torch.arange(n, device=dev) * self.chunk_size
        st.w_reset = self._reset_target()
        if not self.frozen:
            st.w = st.w_reset.expand(n, -1, -1).clone()
            st.pending_z = torch.zeros(n, self.chunk_size, self.hidden, device=dev, dtype=F32)
            st.pending_x0 = torch.zeros(n, self.chunk_size, self.dim, device=dev, dtype=F32)
            st.recorder = self.new_recorder(n, dev)
        return st

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's checkpoint tensors by name (`TENSOR_NAMES`): θ0 and the target generator's weights."""
        tg = self.target_generator
        return dict(zip(TENSOR_NAMES, (self.w_down, tg.conv1d.conv.weight, tg.W_target.weight)))

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
        return self._w_cast.get((w,), lambda: w.to(dtype), dtype)

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

    def _rule(self) -> UpdateRule:
        """The update rule with this layer's current settings (`lr` changes with `set_rate`)."""
        return UpdateRule(self.chunk_size, self.target_generator, self.lr, self.clip, self.clip_eps, self.w_down)

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
                return step_one(state, self._rule(), z, x0, state.clock.take()).to(x.dtype)
        refuse_graph_capture(x)
        return run_tokens(state, self._rule(), z, x0).to(x.dtype)


class InPlaceTTTGating(InPlaceGating):
    """The In-Place TTT layer (`InPlaceGating`) with what commands ask of a fast-weight layer: snapshots of a
    stream, its counters, its settings and memory (SPEC §3.9). Args as `InPlaceGating`."""

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

    @classmethod
    def check_stored(cls, tensors: dict[str, torch.Tensor], chunk_size: int, pending_tokens: int | None) -> str | None:
        """W is a matrix, the pending chunk's rows agree with each other, with W, the chunk size and the metadata."""
        w, z, x0 = (tensors.get(n) for n in ("w", "pending_z", "pending_x0"))
        if w is None or z is None or x0 is None:
            return None  # other names: `check_capture` names them against the model
        if w.dim() != 2 or z.dim() != 2 or x0.dim() != 2:
            return (f"w, pending_z and pending_x0 must be matrices, got shapes {list(w.shape)}, {list(z.shape)}, "
                    f"{list(x0.shape)}.")
        d, h = w.shape
        if z.shape[0] != x0.shape[0] or z.shape[1] != h or x0.shape[1] != d:
            return (f"pending_z {list(z.shape)} and pending_x0 {list(x0.shape)} do not fit w {list(w.shape)} "
                    f"(expected [n, {h}] and [n, {d}]).")
        if z.shape[0] >= chunk_size:
            return f"{z.shape[0]} pending tokens, but a chunk of {chunk_size} would have been applied."
        if pending_tokens is not None and pending_tokens != z.shape[0]:
            return f"metadata says {pending_tokens} pending tokens, the tensors hold {z.shape[0]}."
        return None

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        return {"w_down": self.w_down}

    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        return self.checkpoint_tensors()

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
        # MACs per token: plain = gate+up (2hd) + down (hd); TTT adds Δ = V̂ᵀZ (hd) and the target, one
        # convolution with W_target folded into its kernel (K d²; the fold, K d³ once, is cached across calls).
        return (4 * h * d + k * d * d) / (3 * h * d), f"(4hd + Kd²) / 3hd (d={d}, h={h}, K={k})"

    def flush_partial(self, batch_index: int | None = None) -> None:
        flush(self._state(), self._rule(), batch_index)
