"""YaRN context extension for moshi's RoPE, with the fine-tuning fork's frequencies (SPEC §4.3).

The main transformer's `RotaryEmbedding` instance (one object shared by the transformer and every
attention layer) is replaced by `YarnRotaryEmbedding`, a subclass with the same call signature that
rotates with precomputed float32 frequencies and scales the rotated queries by the attention factor.
The depformer has no RoPE and is left alone.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import asdict, dataclass

import torch
from moshi.modules.rope import RotaryEmbedding

from ..errors import ConfigError

F32 = torch.float32


@dataclass
class YarnConfig:
    """The `yarn_config` section (the fork's keys and defaults; `original_max_seq_len` defaults to
    the config's `context`, the attention window the base model was trained with)."""

    enabled: bool = True
    scale: float = 1.0
    original_max_seq_len: int | None = None
    beta_fast: float = 32
    beta_slow: float = 1
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_dict(cls, d: tp.Any, context: int | None) -> "YarnConfig | None":
        """Validated section, or None when absent or disabled."""
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ConfigError(f"`yarn_config` must be a JSON object, got {type(d).__name__}.")
        valid = list(cls.__dataclass_fields__)
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown key(s) in `yarn_config`: {', '.join(unknown)}. Valid keys: {', '.join(valid)}.")
        cfg = cls(**{k: v for k, v in d.items() if v is not None})
        if not cfg.enabled:
            return None
        if cfg.original_max_seq_len is None:
            cfg.original_max_seq_len = context if context is not None else 3000

        def num(name: str, positive: bool = True) -> None:
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
                raise ConfigError(f"`yarn_config.{name}` must be a {'positive ' if positive else ''}number, got {v!r}.")
        for name in ("scale", "original_max_seq_len", "beta_fast", "beta_slow"):
            num(name)
        num("mscale", positive=False)
        num("mscale_all_dim", positive=False)
        if cfg.beta_fast == cfg.beta_slow:
            raise ConfigError("`yarn_config`: beta_fast and beta_slow must differ (they bound the frequency ramp).")
        return cfg

    @property
    def active(self) -> bool:
        """The fork changes RoPE only for scale > 1 (scale <= 1 keeps moshi's own rotation)."""
        return self.scale > 1.0

    def context(self, context: int) -> int:
        """The attention window the fork's inference uses: int(context × scale)."""
        return int(context * self.scale) if self.active else context

    def to_dict(self) -> dict:
        return asdict(self)


def yarn_inv_freq(head_dim: int, max_period: float, cfg: YarnConfig) -> torch.Tensor:
    """[D/2] float32 inverse frequencies, as the fork's `_compute_yarn_parameters` computes them:
    f_j = 1 / max_period^(j/(D/2)), λ_j = 2π·max_period^(j/(D/2)),
    r_j = clamp((λ_j − β_slow·L) / (β_fast·L − β_slow·L), 0, 1), f'_j = (1 − r_j)·f_j + r_j·f_j/scale."""
    if head_dim % 2:
        raise ConfigError(f"YaRN needs an even head dimension, got {head_dim}.")
    half = head_dim // 2
    ratio = torch.arange(half, dtype=F32) / half  # [D/2]
    period = max_period ** ratio
    inv_freq = 1.0 / period
    if not cfg.active:
        return inv_freq
    wavelength = 2 * math.pi * period
    L = cfg.original_max_seq_len
    lo, hi = cfg.beta_slow * L, cfg.beta_fast * L  # the fork's thresholds: β·L, not the paper's L/β
    ramp = ((wavelength - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (1 - ramp) * inv_freq + ramp * (inv_freq / cfg.scale)


def yarn_attention_factor(cfg: YarnConfig) -> float:
    """The fork's query scale: 1 unless `mscale` != 1; then m(mscale) [/ m(mscale_all_dim) when > 0],
    m(x) = 0.1·x·ln(scale) + 1."""
    if not cfg.active or cfg.mscale == 1.0:
        return 1.0

    def m(x: float) -> float:
        return 0.1 * x * math.log(cfg.scale) + 1.0
    return m(cfg.mscale) / m(cfg.mscale_all_dim) if cfg.mscale_all_dim > 0 else m(cfg.mscale)


class YarnRotaryEmbedding(RotaryEmbedding):
    """moshi's `RotaryEmbedding` interface with given float32 frequencies and a query-only factor.

    Args:
        inv_freq: [D/2] inverse frequencies.
        attention_factor: multiplies the rotated queries (in float32, before the cast back).
        interleave: moshi's layout of the rotated pairs (True: [r0, i0, r1, i1, ...]).
        max_period: kept for code that reads it.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_factor: float, interleave: bool, max_period: float):
        super().__init__(interleave=interleave, max_period=max_period)
        self.register_buffer("inv_freq", inv_freq.detach().to(F32).clone(), persistent=False)
        self.attention_factor = float(attention_factor)

    def _apply(self, fn, recurse=True):
        # The frequencies stay float32 whatever dtype the LM is cast to (SPEC §4.3).
        super()._apply(fn, recurse)
        self.inv_freq.data = self.inv_freq.data.to(F32)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, time_before_heads: bool = False):
        # q, k: [B, H, T, D] ([B, T, H, D] when time_before_heads); offset [B] (or scalar)
        T = q.shape[1] if time_before_heads else q.shape[2]
        pos = offset.float().view(-1, 1) + torch.arange(T, device=q.device, dtype=F32)  # [B, T]
        angle = self.inv_freq.to(q.device) * pos[..., None]  # [B, T, D/2]
        angle = angle[:, :, None] if time_before_heads else angle[:, None]
        cos, sin = torch.cos(angle), torch.sin(angle)
        return (self._rotate(q, cos, sin, self.attention_factor), self._rotate(k, cos, sin, 1.0))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, factor: float) -> torch.Tensor:
        D = x.shape[-1]
        if self.interleave:
            pairs = x.view(*x.shape[:-1], D // 2, 2)
            re, im = pairs[..., 0].float(), pairs[..., 1].float()
        else:
            re, im = x[..., : D // 2].float(), x[..., D // 2:].float()
        out_re = re * cos - im * sin
        out_im = re * sin + im * cos
        if factor != 1.0:
            out_re, out_im = out_re * factor, out_im * factor
        out_re, out_im = out_re.to(x.dtype), out_im.to(x.dtype)
        if self.interleave:
            return torch.stack([out_re, out_im], dim=-1).view(x.shape)
        return torch.cat([out_re, out_im], dim=-1)


def apply_yarn(lm, cfg: YarnConfig) -> dict:
    """Replaces the main transformer's RoPE (the shared instance and every attention's reference).

    Args:
        lm: a moshi LMModel built with the extended `context` (`cfg.context(...)`).
        cfg: an enabled YaRN section; with scale <= 1 nothing is replaced (the fork's behaviour).
    Returns:
        what was applied, for provenance.
    """
    tr = lm.transformer
    rope = getattr(tr, "rope", None)
    if rope is None:
        raise ConfigError("`yarn_config` is enabled but the model's main transformer has no RoPE "
                          f"(positional_embedding = {getattr(tr, 'positional_embedding', None)!r}).")
    info = {**cfg.to_dict(), "replaced_rope": False, "attention_factor": 1.0,
            "context": int(lm.transformer.layers[0].self_attn.context or 0)}
    if not cfg.active:
        return info
    head_dim = tr.layers[0].self_attn.embed_dim // tr.layers[0].self_attn.num_heads
    inv_freq = yarn_inv_freq(head_dim, float(rope.max_period), cfg).to(next(lm.parameters()).device)
    factor = yarn_attention_factor(cfg)
    new = YarnRotaryEmbedding(inv_freq, factor, rope.interleave, rope.max_period)
    tr.rope = new
    for layer in tr.layers:
        if getattr(layer.self_attn, "rope", None) is rope:
            layer.self_attn.rope = new
    info.update(replaced_rope=True, attention_factor=factor)
    return info
