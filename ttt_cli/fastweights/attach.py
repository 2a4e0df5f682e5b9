"""Attaching fast-weight layers to a moshi `LMModel`: one registry of variants, `ttt_layers`, `set_ttt_lr`."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
from torch import nn

from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule

from . import adapter, inplace, inplace_attach, mlp
from .config import FastWeightConfig
from .interface import FastWeightLayer


def _forget_streaming_children(lm: nn.Module) -> None:
    # moshi caches streaming children on first `streaming()`; layers attached later would never
    # stream and stay at W0 (pitfall 10), so drop every cache below the LM. moshi has no public call for it.
    for m in lm.modules():
        if isinstance(m, StreamingModule):
            m._cached_children = None


def _counted(tensor_names: tp.Callable[[tp.Any], list[str]]) -> tp.Callable[..., dict]:
    """A variant's provenance of its tensors as counts: how many came from the checkpoint, how many are fresh."""
    def provenance(cfg: FastWeightConfig, origins: dict[str, str], target_init: str) -> dict:
        names = tensor_names(cfg)
        fresh = sum(k not in origins for k in names)
        return {"variant": cfg.variant, "fresh": fresh, "from_checkpoint": len(names) - fresh}
    return provenance


@dataclass(frozen=True)
class Variant:
    """What loading and writing checkpoints need from a variant (the only place variants are listed)."""

    attach: tp.Callable[..., dict[int, FastWeightLayer]]          # (lm, cfg, tensors, target_init)
    tensor_names: tp.Callable[[tp.Any], list[str]]                # checkpoint tensors of a config
    fresh_tensors: tp.Callable[..., dict[str, torch.Tensor]]      # (lm, cfg, target_init): documented fresh init
    fresh_note: tp.Callable[..., str]                             # (cfg, target_init): how missing tensors are made
    provenance: tp.Callable[..., dict]                            # (cfg, {key: where from}, target_init)
    layer: type[FastWeightLayer]                                  # its layer class (answers for its own tensors)


VARIANTS: dict[str, Variant] = {
    "inplace": Variant(inplace_attach.attach, inplace_attach.tensor_names, inplace_attach.fresh_tensors,
                       inplace_attach.fresh_note, inplace_attach.provenance, inplace.InPlaceTTTGating),
    "mlp": Variant(mlp.attach, mlp.tensor_names, mlp.fresh_tensors, mlp.fresh_note, _counted(mlp.tensor_names), mlp.HybridTTTBlock),
    "linear-adapter": Variant(adapter.attach, adapter.tensor_names, adapter.fresh_tensors, adapter.fresh_note,
                              _counted(adapter.tensor_names), adapter.AdapterGroup),
}


def variant_of(cfg: FastWeightConfig) -> Variant:
    """The registry entry of `cfg`'s variant."""
    return VARIANTS[cfg.variant]


def layer_class(variant: str) -> type[FastWeightLayer]:
    """The layer class of a variant name, for checks made before any layer exists (a snapshot file's tensors).

    Args:
        variant: a variant name (`inplace`, `mlp`, `linear-adapter`).
    """
    return VARIANTS[variant].layer


def attach_ttt(lm: LMModel, cfg: FastWeightConfig, tensors: dict[str, torch.Tensor] | None = None,
               target_init: str = "ntp") -> dict[int, FastWeightLayer]:
    """Attaches the fast-weight layers of `cfg` (any variant) to the layers it names.

    Args:
        lm: a moshi LMModel with its weights loaded.
        cfg: the validated `ttt` section.
        tensors: TTT tensors with checkpoint key names (SPEC §4.2 for In-Place, §3.10/§3.11 for the
            variants); missing ones get the variant's documented fresh init.
        target_init: In-Place: `ntp` or `zero`, for target generators the tensors do not provide.
    Returns:
        {layer index: fast-weight layer}.
    """
    cfg.validate(len(lm.transformer.layers))
    out = variant_of(cfg).attach(lm, cfg, tensors or {}, target_init)
    _forget_streaming_children(lm)
    return out


def ttt_layers(lm: nn.Module) -> dict[int, FastWeightLayer]:
    """{layer index: fast-weight layer} of a moshi LMModel (empty when TTT is off)."""
    tr = getattr(lm, "transformer", None)
    if tr is None:
        return {}
    out = {}
    for i, layer in enumerate(tr.layers):
        for child in layer.children():
            if isinstance(child, FastWeightLayer):
                out[i] = child
    return out


def state_bytes_per_stream(lm: nn.Module) -> int:
    """Fast-weight state bytes one stream needs, over every TTT layer (SPEC §5's estimate)."""
    return sum(layer.state_bytes_per_stream() for layer in ttt_layers(lm).values())


def set_ttt_lr(lm: nn.Module, lr: float) -> None:
    """Sets every fast-weight layer's rate (`lr`, `base_lr` or `lr_scale`; 0 freezes them); not while streaming."""
    for layer in ttt_layers(lm).values():
        layer.set_rate(lr)
