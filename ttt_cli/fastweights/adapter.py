"""Variant `linear-adapter`: TTT-Linear adapters beside chosen moshi linears, the way LoRA sits (SPEC §3.11).

`out = base(x) + scale · o Wo^T` where o is the causal mini-batch learner's output (inner model
`linear`, one head of rank r) on q = x Wq^T, k = x Wk^T and the target v − k (v = x Wv^T). The
adapted module replaces the moshi linear and stays an `nn.Linear` (moshi's attention requires it);
the per-stream state of a layer's adapters lives in one `AdapterGroup` (the layer's `ttt` child).
"""

from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating, gating_forward_generic
from moshi.modules.lora import LoRALinear

from ..errors import CheckpointError
from .config import AdapterConfig
from .interface import FastWeightLayer
from .learner_token import TokenInputs
from .learner_math import F32, Norm
from .learner_layer import Derived, Float32Module, Learner, LearnerLayer, load_tensors, plain_layer_macs, time_bypassed

PREFIX = "transformer.layers.{i}.{target}.ttt_adapter."
FRESH_SEED = 31415  # fresh adapters are deterministic: seed + 16·layer + target index
LR_GATE_INIT = -2.0
INIT_STD = 0.02
TENSOR_NAMES = ("wq", "wk", "wv", "wo", "W1", "b1", "ttt_norm_weight", "ttt_norm_bias", "lr_gate")


class AdapterParams(Float32Module):
    """One adapter's tensors (SPEC §3.11 names): wq, wk, wv [r,in], wo [out,r], W1 [1,r,r], b1 [1,r] (θ0),
    ttt_norm_weight/bias [1,r], lr_gate []."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None):
        super().__init__()
        kw = {"device": device, "dtype": F32}
        self.wq = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.wk = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.wv = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.wo = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.W1 = nn.Parameter(torch.zeros(1, rank, rank, **kw))
        self.b1 = nn.Parameter(torch.zeros(1, rank, **kw))
        self.ttt_norm_weight = nn.Parameter(torch.ones(1, rank, **kw))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(1, rank, **kw))
        self.lr_gate = nn.Parameter(torch.tensor(LR_GATE_INIT, **kw))
        self._proj = Derived(_learning_projection)
        self._eta = Derived(lambda parts, scale: (scale * parts[0].sigmoid()).view(1, 1, 1))
        self._grad_norm = Derived(lambda parts: Norm.of(parts[0], parts[1]).scaled(parts[2]))

    def learning_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [3r+2, in], bias [3r+2]) of one product giving [k, 1, q, 1, v − k] per token: the learner's
        x̃ of the key and the query and the target (`learner.TokenInputs`' layout), in one call."""
        return self._proj([self.wk, self.wq, self.wv])

    def eta(self, lr_scale: float) -> torch.Tensor:
        """η = lr_scale · sigmoid(lr_gate), [1, 1, 1]."""
        return self._eta([self.lr_gate], lr_scale)

    def grad_norm(self, lr_scale: float) -> Norm:
        """The learner's `Norm.scaled(η)`: η is one number per adapter, folded into the gradient's constants."""
        return self._grad_norm([self.ttt_norm_weight, self.ttt_norm_bias, self.eta(lr_scale)])

    @torch.no_grad()
    def init_fresh(self, generator: torch.Generator) -> None:
        """Wq/Wk/Wv kaiming-uniform like LoRA's A, Wo = 0 (the adapter starts exactly off), W1 ~ normal(0, 0.02),
        b1 = 0, ttt_norm γ 1 β 0, lr_gate −2. Drawn on the CPU from `generator`."""
        for t in (self.wq, self.wk, self.wv):
            cpu = torch.empty(t.shape, dtype=F32)
            nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
            t.copy_(cpu)
        self.W1.copy_(torch.empty(self.W1.shape, dtype=F32).normal_(0.0, INIT_STD, generator=generator))
        for t in (self.wo, self.b1, self.ttt_norm_bias):
            t.zero_()
        self.ttt_norm_weight.fill_(1.0)
        self.lr_gate.fill_(LR_GATE_INIT)


def _learning_projection(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`AdapterParams.learning_projection` from [wk, wq, wv]: rows wk, 0, wq, 0, wv − wk with bias 1 on the zero rows."""
    wk, wq, wv = parts
    r, n = wk.shape
    zero = wk.new_zeros(1, n)
    bias = wk.new_zeros(3 * r + 2)
    bias[r] = bias[2 * r + 1] = 1.0
    return torch.cat([wk, zero, wq, zero, wv - wk], 0), bias


class TTTAdapterLinear(nn.Linear):
    """A moshi linear with a TTT adapter beside it: `base(x) + A(x)`. Still an `nn.Linear` whose `weight`
    (and `bias`) are the base's own parameters; a LoRA-wrapped base is kept as the `base` child."""

    def __init__(self, base: nn.Module, target: str, rank: int, group: "AdapterGroup", device=None):
        if isinstance(base, TTTAdapterLinear):
            raise CheckpointError(f"{target} already has a TTT adapter.")
        if isinstance(base, LoRALinear):
            weight, bias = base.frozen_W.weight, base.frozen_W.bias
        elif isinstance(base, nn.Linear):
            weight, bias = base.weight, base.bias
        else:
            raise CheckpointError(f"{target} is a {type(base).__name__}, not a linear an adapter can sit beside.")
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f, bias=False, device="meta")
        self.weight = weight
        self.bias = bias
        if isinstance(base, LoRALinear):
            self.base = base
        self.target = target
        self.ttt_adapter = AdapterParams(in_f, out_f, rank, device)
        object.__setattr__(self, "_group", group)  # the layer's state holder: a reference, not a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base(x) if "base" in self._modules else F.linear(x, self.weight, self.bias)
        group: AdapterGroup = self._group  # type: ignore[assignment]
        if group.bypass:
            return base
        return group.adapt(self.target, x, base)


_GATING_CLASSES: dict[type, type] = {}


def _adapted_gating_class(cls: type) -> type:
    """A subclass of moshi's `ActivationGating` whose forward takes moshi's generic path (it calls the linear
    modules) instead of F.linear on their weights, which would skip the adapters (SPEC pitfall 11)."""
    if cls not in _GATING_CLASSES:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return gating_forward_generic(self.linear_in, self.linear_out, self.activation, x)

        _GATING_CLASSES[cls] = type(f"TTTAdapted{cls.__name__}", (cls,), {"__module__": __name__, "forward": forward})
    return _GATING_CLASSES[cls]


class AdapterGroup(LearnerLayer):
    """The fast-weight layer of one transformer layer's adapters: one learner per target, in one state."""

    variant = "linear-adapter"
    structural = frozenset({"variant", "layers", *AdapterConfig.structural_keys})
    rate_key = AdapterConfig.rate_key

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.chunk_size = cfg.chunk_size
        self.rank = cfg.rank
        self.scale = cfg.scale
        self.lr_scale = cfg.lr_scale
        self.targets = list(cfg.targets)
        self._adapters: dict[str, TTTAdapterLinear] = {}
        self._host: nn.Module | None = None

    def add(self, adapter: TTTAdapterLinear) -> None:
        """Registers an adapter whose learner state this group holds (by reference, not as a child)."""
        if adapter.target not in self.targets:
            raise ValueError(f"{adapter.target} is not one of this group's targets {self.targets}.")
        self._adapters[adapter.target] = adapter

    def params(self, target: str) -> AdapterParams:
        return self._adapters[target].ttt_adapter

    def learners(self) -> dict[str, Learner]:
        return {t: self.learner(t) for t in self.targets}

    def learner(self, name: str) -> Learner:
        p = self.params(name)
        return Learner({"W1": p.W1, "b1": p.b1}, p.ttt_norm_weight, p.ttt_norm_bias, "linear")

    def adapt(self, target: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """base + A(x), A(x) = scale · o Wo^T for one adapter: x [B, T, in], base [B, T, out] (the linear's output)."""
        P = self.params(target)
        h = x if x.dtype == F32 else x.to(F32)
        B, T, _ = h.shape
        r = self.rank
        st = self._streaming_state
        if st is not None and st.frozen:
            q = F.linear(h, P.wq).unsqueeze(1)  # [B, 1, T, r]: a frozen learner reads the query only
            keys = token = None
        else:
            proj = F.linear(h, *P.learning_projection())  # [B, T, 3r+2]: k, 1, q, 1, v − k in one product
            q = proj[..., r + 1:2 * r + 1].unsqueeze(1)  # [B, 1, T, r]

            def keys():
                k = proj[..., :r].unsqueeze(1)
                return k, proj[..., 2 * r + 2:].unsqueeze(1), P.eta(self.lr_scale).expand(B, 1, T)

            def token():  # T = 1: x̃ [B, 2, r+1] and the target [B, 1, r] are views of the projection
                return TokenInputs(proj[..., :2 * r + 2].view(B, 2, r + 1), proj[..., 2 * r + 2:],
                                   P.grad_norm(self.lr_scale))

        o = self.run_learner(target, q, keys, token)[:, 0]  # [B, T, r]
        if base.dtype == F32:
            if base.is_contiguous() and not (base.requires_grad and torch.is_grad_enabled()):
                # into the linear's own fresh output: a new [B, T, out] sum costs its first touch (gating's
                # linear_in at T = 4096: 46 MB, three times the product)
                base.view(B * T, -1).addmm_(o.reshape(B * T, r), P.wo.T, alpha=self.scale)
                return base
            return torch.baddbmm(base, o, P.wo.T.expand(B, -1, -1), alpha=self.scale)
        out = o @ P.wo.T  # [B, T, out]
        return base + (out if self.scale == 1.0 else self.scale * out).to(base.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an AdapterGroup holds state; its adapters run inside the linears they sit beside.")

    # -- interface ---------------------------------------------------------------------------------
    def fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{t}.{k}": v for t in self.targets for k, v in self.params(t).state_dict(keep_vars=True).items()}

    def config_section(self) -> dict[str, tp.Any]:
        return {"variant": self.variant, "chunk_size": self.chunk_size, "targets": list(self.targets),
                "rank": self.rank, "scale": self.scale, "lr_scale": self.lr_scale}

    def forwards_vs_plain(self, tokens: int, generator: torch.Generator
                          ) -> tuple[tp.Callable[[], tp.Any], tp.Callable[[], tp.Any], str]:
        host = self._host
        assert host is not None
        w = next(host.norm1.parameters())
        x = torch.randn(1, tokens, host.self_attn.embed_dim, generator=generator).to(w.device, w.dtype)  # [1, T, d]
        return (lambda: host(x)), time_bypassed(self, lambda: host(x)), \
            f"moshi StreamingTransformerLayer with adapters on {', '.join(self.targets)} vs without"

    def macs_vs_plain(self, tokens: int) -> tuple[float, str]:
        assert self._host is not None
        plain, plain_f = plain_layer_macs(self._host, tokens)
        r, C = self.rank, self.chunk_size
        # per token and adapter: projections 3·in·r + out·r; key pass, query pass and gradient sums
        # (3r²); the dual form's C x C products (2Cr).
        extra = sum(3 * a.in_features * r + a.out_features * r + 3 * r * r + 2 * C * r for a in self._adapters.values())
        return (plain + extra) / plain, f"(plain + Σ_adapters (3·in·r + out·r + 3r² + 2Cr)) / plain; {plain_f}, r={r}, C={C}"


def _parent(layer: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, leaf = target.split(".")
    mod = layer
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def _fresh_seed(index: int, t: int) -> torch.Generator:
    """The generator of layer `index`'s adapter `t`: the same fresh init wherever it is drawn."""
    return torch.Generator().manual_seed(FRESH_SEED + 16 * index + t)


def _fresh_params(base: nn.Module, index: int, t: int, rank: int, device=None) -> AdapterParams:
    w = base.frozen_W.weight if isinstance(base, LoRALinear) else base.weight
    p = AdapterParams(w.shape[1], w.shape[0], rank, device)
    p.init_fresh(_fresh_seed(index, t))
    return p


def attach(lm: LMModel, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], target_init: str = "ntp"
           ) -> dict[int, FastWeightLayer]:
    """Puts adapters beside `cfg.targets` of each layer of `cfg.layers` (tensors
    `transformer.layers.{i}.{target}.ttt_adapter.*`; missing ones get the fresh init, Wo = 0)."""
    out: dict[int, FastWeightLayer] = {}
    for i in cfg.layers:
        layer = lm.transformer.layers[i]
        if "ttt" in layer._modules:
            raise CheckpointError(f"layer {i} already has TTT attached.")
        if any(t.startswith("gating.") for t in cfg.targets) and not isinstance(layer.gating, ActivationGating):
            raise CheckpointError(f"layer {i} has no gated MLP ({type(layer.gating).__name__}) for gating adapters.")
        group = AdapterGroup(cfg)
        for j, target in enumerate(cfg.targets):
            parent, leaf = _parent(layer, target)
            base = getattr(parent, leaf)
            dev = next(base.parameters()).device
            adapter = TTTAdapterLinear(base, target, cfg.rank, group, dev)
            adapter.ttt_adapter.init_fresh(_fresh_seed(i, j))  # drawn on the CPU, copied to the device
            load_tensors(adapter.ttt_adapter, tensors, PREFIX.format(i=i, target=target))
            setattr(parent, leaf, adapter)
            group.add(adapter)
        if any(t.startswith("gating.") for t in cfg.targets):
            layer.gating.__class__ = _adapted_gating_class(type(layer.gating))
        object.__setattr__(group, "_host", layer)
        layer.ttt = group
        out[i] = group
    return out


def tensor_names(cfg: AdapterConfig) -> list[str]:
    return [PREFIX.format(i=i, target=t) + n for i in cfg.layers for t in cfg.targets for n in TENSOR_NAMES]


def fresh_tensors(lm: LMModel, cfg: AdapterConfig, target_init: str = "ntp") -> dict[str, torch.Tensor]:
    out = {}
    for i in cfg.layers:
        for j, target in enumerate(cfg.targets):
            parent, leaf = _parent(lm.transformer.layers[i], target)
            p = _fresh_params(getattr(parent, leaf), i, j, cfg.rank, "cpu")
            pre = PREFIX.format(i=i, target=target)
            out.update({pre + k: v.detach().clone().contiguous() for k, v in p.state_dict().items()})
    return out


def fresh_note(cfg: AdapterConfig, target_init: str = "ntp") -> str:
    return "fresh TTT-Linear adapters (SPEC §3.11: Wo = 0, so each adapter adds exactly nothing until trained)"
