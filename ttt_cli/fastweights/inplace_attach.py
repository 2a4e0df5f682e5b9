"""In-Place TTT's entry in the variant registry: attaching it to a moshi LM, its checkpoint tensors and their fresh init."""

from __future__ import annotations

import torch

from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating

from ..errors import CheckpointError
from .config import TTTConfig
from .inplace import TARGET_TENSORS, TENSOR_NAMES, W0, InPlaceTTTGating, checkpoint_key
from .inplace_target import TargetGenerator, linear_weight, x0_source
from .interface import FastWeightLayer


def attach(lm: LMModel, cfg: TTTConfig, tensors: dict[str, torch.Tensor],
           target_init: str = "ntp") -> dict[int, FastWeightLayer]:
    """Replaces `lm.transformer.layers[i].gating` with In-Place TTT for every i in `cfg.layers`; tensors it is
    given (checkpoint keys) replace the fresh init (W0 = linear_out, target generator `target_init`)."""
    layers = lm.transformer.layers
    src = x0_source(lm)
    out: dict[int, FastWeightLayer] = {}
    for i in cfg.layers:
        gating = layers[i].gating
        if isinstance(gating, FastWeightLayer):
            raise CheckpointError(f"layer {i} already has a TTT layer attached.")
        if not isinstance(gating, ActivationGating):
            raise CheckpointError(f"layer {i} has no gated MLP to make TTT (found {type(gating).__name__}).")
        layer = InPlaceTTTGating(gating.linear_in, gating.linear_out, gating.activation, cfg, src)
        layer.target_generator.init(target_init)
        with torch.no_grad():
            for name, dst in layer.checkpoint_tensors().items():
                key = checkpoint_key(i, name)
                if key in tensors:
                    val = tensors[key]
                    if tuple(val.shape) != tuple(dst.shape):
                        raise CheckpointError(f"TTT tensor {key} has shape {tuple(val.shape)}, "
                                              f"layer {i} needs {tuple(dst.shape)} (d={layer.dim}, h={layer.hidden}, "
                                              f"kernel {cfg.conv_kernel_size}).")
                    dst.copy_(val.to(dst.device, torch.float32))
        layers[i].gating = layer
        out[i] = layer
    return out


def tensor_names(cfg: TTTConfig) -> list[str]:
    """The checkpoint tensors of `cfg`: every layer's target generator, then every layer's W0 (the order in
    which a load names the ones a checkpoint lacks)."""
    return ([checkpoint_key(i, n) for i in cfg.layers for n in TARGET_TENSORS]
            + [checkpoint_key(i, W0) for i in cfg.layers])


def fresh_tensors(lm: LMModel, cfg: TTTConfig, target_init: str = "ntp") -> dict[str, torch.Tensor]:
    """SPEC §3.6: w_down <- linear_out (float32), target generator `ntp` or `zero`."""
    out = {}
    for i in cfg.layers:
        g = lm.transformer.layers[i].gating
        w = linear_weight(g.linear_out).detach().to("cpu", torch.float32).contiguous()
        tg = TargetGenerator(w.shape[0], cfg.conv_kernel_size, cfg.conv_padding)
        tg.init(target_init)
        values = (w.clone(), tg.conv1d.conv.weight.detach().contiguous(), tg.W_target.weight.detach().contiguous())
        out.update({checkpoint_key(i, n): v for n, v in zip(TENSOR_NAMES, values)})
    return out


def fresh_note(cfg: TTTConfig, target_init: str = "ntp") -> str:
    return f"initialised by SPEC §3.6 (w_down <- linear_out, target {target_init})"


def provenance(cfg: TTTConfig, origins: dict[str, str], target_init: str) -> dict:
    """Where each layer's tensors came from (`origins`: checkpoint key -> where, for those not freshly made)."""
    return {"w0": {str(i): origins.get(checkpoint_key(i, W0), "linear_out") for i in cfg.layers},
            "target": {k: origins.get(k, f"initialised ({target_init})")
                       for k in [checkpoint_key(i, n) for i in cfg.layers for n in TARGET_TENSORS]},
            "activation": cfg.activation or "the layer's own", "target_source": cfg.target_source,
            "delta_clip_fro_norm": cfg.delta_clip_fro_norm}
