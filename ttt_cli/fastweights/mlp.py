"""Variant `mlp`: a TTT-MLP block between the self-attention and the feed-forward of chosen moshi layers (SPEC §3.10).

`x ← x + SA(norm1(x))`; `x ← x + tanh(α) ⊙ TTT(x)`; `x ← x + FF(norm2(x))`. TTT(x) projects x to
per-head queries/keys (L2-normalised) and values, learns the reconstruction target of ttt-video-dit
with the causal mini-batch learner (inner model `mlp`) and maps its output back with
post_norm + `wo`. Adapted from ttt-video-dit's hybrid block, made causal (ttt-lm's 1/i form).
"""

from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformerLayer

from ..errors import CheckpointError
from .config import MLPConfig
from .interface import FastWeightLayer
from .learner_math import F32
from .learner_layer import (Derived, Learner, LearnerLayer, StackedWeights, TransposedWeights, linear_t, load_tensors,
                            plain_layer_macs, time_bypassed)

PREFIX = "transformer.layers.{i}.ttt."
FRESH_SEED = 20240  # fresh blocks are deterministic per layer: seed + layer index
TARGET_EPS = 1e-8
POST_NORM_EPS = 1e-6
INIT_STD = 0.02


class HybridTTTBlock(LearnerLayer):
    """TTT(x) of SPEC §3.10 and its gate; returns tanh(α) ⊙ TTT(x), what the layer adds to its residual.

    Args:
        dim: the transformer's d.
        heads: H (p = d / H).
        cfg: the `mlp` config section.
        device: where the parameters live (always float32).
    """

    variant = "mlp"
    structural = frozenset({"variant", "layers", *MLPConfig.structural_keys})
    rate_key = MLPConfig.rate_key

    def __init__(self, dim: int, heads: int, cfg: MLPConfig, device=None):
        super().__init__()
        p = dim // heads
        self.dim, self.heads, self.head_dim = dim, heads, p
        self.chunk_size = cfg.chunk_size
        self.base_lr = cfg.base_lr
        kw = {"device": device, "dtype": F32}
        self.wq = nn.Linear(dim, dim, **kw)
        self.wk = nn.Linear(dim, dim, **kw)
        self.wv = nn.Linear(dim, dim, **kw)
        self.wo = nn.Linear(dim, dim, **kw)
        self.W1 = nn.Parameter(torch.zeros(heads, p, 4 * p, **kw))
        self.b1 = nn.Parameter(torch.zeros(heads, 4 * p, **kw))
        self.W2 = nn.Parameter(torch.zeros(heads, 4 * p, p, **kw))
        self.b2 = nn.Parameter(torch.zeros(heads, p, **kw))
        self.ttt_norm_weight = nn.Parameter(torch.ones(heads, p, **kw))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(heads, p, **kw))
        self.lr_weight = nn.Parameter(torch.zeros(heads, dim, **kw))
        self.lr_bias = nn.Parameter(torch.zeros(heads, **kw))
        self.post_norm = nn.LayerNorm(dim, eps=POST_NORM_EPS, **kw)
        self.gating_alpha = nn.Parameter(torch.full((dim,), cfg.gating_alpha_init, **kw))
        self._host: StreamingTransformerLayer | None = None  # set by `attach` (not a child module)
        self._proj_w, self._proj_b = TransposedWeights(), StackedWeights()  # wq, wk, wv, lr gate: one product
        self._wq_t, self._wo_t = TransposedWeights(), TransposedWeights()
        self._target_affine = Derived(lambda gb, p: (gb[0][:, None] * math.sqrt((p - 1) / p), gb[1][:, None]))

    @torch.no_grad()
    def init_fresh(self, generator: torch.Generator, alpha: float) -> None:
        """SPEC §3.10's fresh init: projections, lr_weight, W1, W2 ~ normal(0, 0.02); biases 0; norms γ 1,
        β 0; gating_alpha = `alpha`. Drawn on the CPU from `generator`, so it is device-independent."""
        for t in (self.wq.weight, self.wk.weight, self.wv.weight, self.wo.weight, self.lr_weight, self.W1, self.W2):
            t.copy_(torch.empty(t.shape, dtype=F32).normal_(0.0, INIT_STD, generator=generator))
        for t in (self.wq.bias, self.wk.bias, self.wv.bias, self.wo.bias, self.b1, self.b2, self.lr_bias,
                  self.ttt_norm_bias, self.post_norm.bias):
            t.zero_()
        self.ttt_norm_weight.fill_(1.0)
        self.post_norm.weight.fill_(1.0)
        self.gating_alpha.fill_(alpha)

    def learners(self) -> dict[str, Learner]:
        return {"": Learner({"W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2},
                            self.ttt_norm_weight, self.ttt_norm_bias, "mlp")}

    # -- forward -----------------------------------------------------------------------------------
    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, p]

    def target(self, v: torch.Tensor) -> torch.Tensor:
        """y = γ_h ⊙ (v − mean v) / (std v + 1e-8) + β_h per head, std unbiased (ttt-video-dit's target).

        Computed as LayerNorm's x̂ = (v − mean) / sqrt(var + ε) (population variance) times sqrt((p − 1)/p): one
        fused kernel instead of seven ops a call. With ε = (1e-8)²·(p − 1)/p it is the same value to float rounding
        wherever std v ≫ 1e-8 (relative difference ~1e-8 / std v), and exactly β for a constant v, as the formula."""
        p = v.shape[-1]
        xhat = torch.native_layer_norm(v, (p,), None, None, TARGET_EPS * TARGET_EPS * (p - 1) / p)[0]
        gamma, beta = self._target_affine([self.ttt_norm_weight, self.ttt_norm_bias], p)  # [H, 1, p] each
        return torch.addcmul(beta, xhat, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = x if x.dtype == F32 else x.to(F32)  # [B, T, d]
        st = self._streaming_state
        if st.frozen if st is not None else self.frozen:  # a frozen learner reads the query only
            q = linear_t(h, self._wq_t([self.wq.weight]), self.wq.bias)
            q = F.normalize(self._heads(q), dim=-1)  # [B, H, T, p]
            k = proj = None
        else:  # q, k, v and the lr gate of every head in one product: [B, T, 3d + H]; q and k normalized in one call
            proj = linear_t(h, self._proj_w([self.wq.weight, self.wk.weight, self.wv.weight, self.lr_weight]),
                            self._proj_b([self.wq.bias, self.wk.bias, self.wv.bias, self.lr_bias]))
            qk = F.normalize(proj[..., :2 * d].view(B, T, 2 * self.heads, self.head_dim).transpose(1, 2), dim=-1)
            q, k = qk[:, :self.heads], qk[:, self.heads:]  # [B, H, T, p] each

        def keys():
            y = self.target(self._heads(proj[..., 2 * d:3 * d]) - k)
            gate = proj[..., 3 * d:].transpose(1, 2)  # [B, H, T]
            return k, y, torch.sigmoid(gate) * (self.base_lr / self.head_dim)

        o = self.run_learner("", q, keys)  # [B, H, T, p]
        out = linear_t(self.post_norm(o.transpose(1, 2).reshape(B, T, d)), self._wo_t([self.wo.weight]), self.wo.bias)
        out = torch.tanh(self.gating_alpha) * out
        return out if x.dtype == F32 else out.to(x.dtype)

    # -- interface ---------------------------------------------------------------------------------
    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict(keep_vars=True))

    def config_section(self) -> dict[str, tp.Any]:
        return {"variant": self.variant, "chunk_size": self.chunk_size, "num_heads": self.heads,
                "base_lr": self.base_lr}

    def forwards_vs_plain(self, tokens: int, generator: torch.Generator
                          ) -> tuple[tp.Callable[[], tp.Any], tp.Callable[[], tp.Any], str]:
        host = self._host
        assert host is not None
        w = next(host.norm1.parameters())
        x = torch.randn(1, tokens, self.dim, generator=generator).to(w.device, w.dtype)  # [1, T, d]
        return (lambda: host(x)), time_bypassed(self, lambda: host(x)), \
            "moshi StreamingTransformerLayer with the TTT-MLP block vs without"

    def macs_vs_plain(self, tokens: int) -> tuple[float, str]:
        assert self._host is not None
        d, H, p, C = self.dim, self.heads, self.head_dim, self.chunk_size
        plain, plain_f = plain_layer_macs(self._host, tokens)
        # per token: projections 4d² and the lr gate Hd; per head the key pass, the gradient sums and
        # the query pass (7 products of p x 4p) and the dual form's C x C products (10Cp).
        extra = 4 * d * d + H * d + H * (28 * p * p + 10 * C * p)
        return (plain + extra) / plain, f"(plain + 4d² + Hd + H(28p² + 10Cp)) / plain; {plain_f}, H={H}, p={p}, C={C}"


_HYBRID_CLASSES: dict[type, type] = {}


def _hybrid_class(cls: type) -> type:
    """A subclass of moshi's layer class whose feed-forward block first adds the TTT block's output to the
    residual stream (after attention), then runs moshi's own `_ff_block`. Attached layers switch their
    `__class__` to it: moshi's code runs unchanged, one method is extended."""
    if cls not in _HYBRID_CLASSES:
        def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
            if not self.ttt.bypass:
                x = x + self.ttt(x)
            return cls._ff_block(self, x)

        _HYBRID_CLASSES[cls] = type(f"TTTHybrid{cls.__name__}", (cls,),
                                    {"__module__": __name__, "_ff_block": _ff_block, "ttt_hybrid": True})
    return _HYBRID_CLASSES[cls]


def _heads_of(layer: StreamingTransformerLayer, cfg: MLPConfig) -> tuple[int, int]:
    d = layer.self_attn.embed_dim
    heads = cfg.num_heads or layer.self_attn.num_heads
    if d % heads:
        raise CheckpointError(f"mlp TTT: num_heads {heads} does not divide the model dimension {d}.")
    return d, heads


def fresh_block(layer: StreamingTransformerLayer, index: int, cfg: MLPConfig, device=None) -> HybridTTTBlock:
    """A block with SPEC §3.10's fresh init for layer `index` (deterministic per index)."""
    d, heads = _heads_of(layer, cfg)
    block = HybridTTTBlock(d, heads, cfg, device)
    block.init_fresh(torch.Generator().manual_seed(FRESH_SEED + index), cfg.gating_alpha_init)
    return block


def attach(lm: LMModel, cfg: MLPConfig, tensors: dict[str, torch.Tensor], target_init: str = "ntp"
           ) -> dict[int, FastWeightLayer]:
    """Inserts a TTT-MLP block into each layer of `cfg.layers` (tensors `transformer.layers.{i}.ttt.*`;
    missing ones get the fresh init). `cfg.num_heads` is resolved to the layer's attention heads if unset."""
    out: dict[int, FastWeightLayer] = {}
    for i in cfg.layers:
        layer = lm.transformer.layers[i]
        if not isinstance(layer, StreamingTransformerLayer) or layer.skip_self_attn:
            raise CheckpointError(f"layer {i} is not a moshi transformer layer with self-attention.")
        if getattr(layer, "ttt_hybrid", False) or "ttt" in layer._modules:
            raise CheckpointError(f"layer {i} already has a TTT block attached.")
        _, heads = _heads_of(layer, cfg)
        cfg.num_heads = heads
        block = fresh_block(layer, i, cfg, next(layer.parameters()).device)
        load_tensors(block, tensors, PREFIX.format(i=i))
        object.__setattr__(block, "_host", layer)  # a back reference, not a child module
        layer.ttt = block
        layer.__class__ = _hybrid_class(type(layer))
        out[i] = block
    return out


TENSOR_NAMES = ("wq.weight", "wq.bias", "wk.weight", "wk.bias", "wv.weight", "wv.bias", "wo.weight", "wo.bias",
                "W1", "b1", "W2", "b2", "ttt_norm_weight", "ttt_norm_bias", "lr_weight", "lr_bias",
                "post_norm.weight", "post_norm.bias", "gating_alpha")


def tensor_names(cfg: MLPConfig) -> list[str]:
    """The checkpoint tensors of `cfg` (SPEC §3.10)."""
    return [PREFIX.format(i=i) + n for i in cfg.layers for n in TENSOR_NAMES]


def fresh_tensors(lm: LMModel, cfg: MLPConfig, target_init: str = "ntp") -> dict[str, torch.Tensor]:
    """Checkpoint tensors of fresh blocks for `lm` (what `attach` uses when a checkpoint has none)."""
    out = {}
    for i in cfg.layers:
        cfg.num_heads = _heads_of(lm.transformer.layers[i], cfg)[1]
        block = fresh_block(lm.transformer.layers[i], i, cfg, "cpu")
        out.update({PREFIX.format(i=i) + k: v.detach().clone().contiguous() for k, v in block.state_dict().items()})
    return out


FRESH_NOTE = ("fresh TTT-MLP blocks (SPEC §3.10: projections and inner MLP ~ normal(0, 0.02), gating_alpha "
              "{alpha}); a fresh block is not neutral: it changes the base model's outputs, so it is for "
              "training and tests")


def fresh_note(cfg: MLPConfig, target_init: str = "ntp") -> str:
    return FRESH_NOTE.format(alpha=cfg.gating_alpha_init)
