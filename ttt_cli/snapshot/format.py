"""The snapshot format: names, versions, the in-memory `FastWeightState` and its per-layer views (SPEC §5.3)."""

from __future__ import annotations

import math
import re
import typing as tp
from dataclasses import dataclass

import torch

from ..fastweights.config import config_class

FORMAT = "ttt-fast-weight-state"
FORMAT_VERSION = 1
FINGERPRINT_VERSION = 2  # 2: fingerprint_tensors + structural keys (1 hashed W0 and lr/clip)
META_KEY = "ttt_state"  # the safetensors header key holding the metadata JSON
LAYER_KEY = re.compile(r"^layers\.(\d+)\.([A-Za-z0-9_.]+)$")  # names may hold dots (adapter targets)
ATTN_PREFIX = "attention."
# Keys added to a variant's section after snapshots of format 1 were written: absent means their default (null).
LATER_KEYS = ("activation",)
INVALID_HINT = "not a valid snapshot: write a new one with `ttt export-state`"
# Which TTT config keys a snapshot records, and which differences are structural (never forced) or
# update-rule rates (forceable), is each variant's config class's business (`structural_keys`,
# `hyper_keys`); `ttt_name` is never recorded.


def config_keys(variant: str) -> list[str]:
    """The `ttt` keys a snapshot of `variant` records in its metadata.

    Args:
        variant: a variant name; an unknown one is a ConfigError.
    """
    return [k for k in config_class(variant).valid_keys() if k != "ttt_name"]


@dataclass
class FastWeightState:
    """One stream's fast-weight snapshot.

    `tensors` maps `layers.{i}.{name}` (the names a layer's `capture` returns; In-Place: `w` [d, h],
    `pending_z` [n, h], `pending_x0` [n, d], float32) and, for `attention=True` captures,
    `attention.{module}.{field}` to tensors. `meta` is the JSON metadata of SPEC §5.3.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, tp.Any]

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.meta["layers"]]

    @property
    def variant(self) -> str:
        return self.meta["variant"]

    @property
    def has_attention(self) -> bool:
        return bool(self.meta.get("attention"))

    @property
    def fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """{name: tensor} of one TTT layer (what `FastWeightLayer.restore` takes)."""
        pre = f"layers.{layer}."
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}

    def pending_tokens(self, layer: int) -> int:
        return int(self.meta.get("pending_tokens", {}).get(str(layer), 0))

    def config(self) -> dict[str, tp.Any]:
        """The TTT config the snapshot was taken with (keys of its variant's `ttt` section)."""
        return {k: self.meta.get(k) for k in config_keys(self.variant)}


def frobenius_norm(tensors: tp.Iterable[torch.Tensor]) -> float:
    """Frobenius norm over several tensors together (float64 accumulation).

    Args:
        tensors: any tensors.
    """
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def weight_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """A layer's fast-weight tensors in a snapshot: every captured tensor but the pending chunk / sums / count
    (a name any of whose dotted parts starts with `pending`).

    Args:
        tensors: one layer's {name: tensor}.
    """
    return sorted(n for n in tensors if not any(part.startswith("pending") for part in n.split(".")))


def weight_norm(s: FastWeightState, layer: int) -> float:
    """‖W‖_F of one layer's fast weights in a snapshot.

    Args:
        s: the snapshot.
        layer: a TTT layer index.
    """
    t = s.layer_tensors(layer)
    return frobenius_norm(t[n] for n in weight_names(t))
