"""Attaching TTT layers to a moshi `LMModel` in place of the chosen layers' gating modules."""

from __future__ import annotations

import torch
from torch import nn

from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule

from .config import TTTConfig
from ..errors import CheckpointError
from .interface import FastWeightLayer
from .inplace import InPlaceTTTGating, X0Source

PREFIX = "transformer.layers.{i}.gating."
TTT_TENSORS = ("w_down", "target_generator.conv1d.conv.weight", "target_generator.W_target.weight")


def _x0_source(lm: LMModel) -> X0Source:
    """Hooks that give TTT layers the current call's token embeddings (SPEC §3.2).

    `input` is the sum of the audio and text token embeddings *before* any condition is added (the
    fork's `token_embeddings`), summed in moshi's order (audio codebooks in order, then text) so that
    it equals moshi's transformer input bit for bit when there is no condition.
    """
    src = getattr(lm, "_ttt_x0", None)
    if src is None:
        src = X0Source()
        acc: list = [None]  # running sum of this call's audio embeddings

        def grab_audio(index: int):
            def hook(_mod, _args, out):
                acc[0] = out if index == 0 or acc[0] is None else acc[0] + out
            return hook

        def grab_text(_mod, _args, out):
            src.text = out
            src.input = out if acc[0] is None else acc[0] + out
            acc[0] = None

        def clear(_mod, _args, _out):
            src.input = src.text = None
            acc[0] = None

        src.handles = [emb.register_forward_hook(grab_audio(i)) for i, emb in enumerate(lm.emb)]
        src.handles += [lm.text_emb.register_forward_hook(grab_text),
                        lm.transformer.register_forward_hook(clear)]
        lm._ttt_x0 = src
    return src


def _forget_streaming_children(lm: nn.Module) -> None:
    # moshi caches streaming children on first `streaming()`; layers attached later would never
    # stream and stay at W0 (pitfall 10), so drop every cache below the LM.
    for m in lm.modules():
        if isinstance(m, StreamingModule):
            m._cached_children = None


def attach_ttt(lm: LMModel, cfg: TTTConfig, tensors: dict[str, torch.Tensor] | None = None,
               target_init: str = "ntp") -> dict[int, FastWeightLayer]:
    """Replaces `lm.transformer.layers[i].gating` for every i in `cfg.layers`.

    Args:
        lm: a moshi LMModel with its weights loaded.
        cfg: the validated `ttt` section.
        tensors: TTT tensors with moshi key names (`transformer.layers.{i}.gating.w_down`, ...);
            missing ones follow `target_init` (SPEC §3.6).
        target_init: `ntp` or `zero`, for target generators the tensors do not provide.
    Returns:
        {layer index: TTT layer}.
    """
    tensors = tensors or {}
    layers = lm.transformer.layers
    cfg.validate(len(layers))
    src = _x0_source(lm)
    out: dict[int, FastWeightLayer] = {}
    for i in cfg.layers:
        gating = layers[i].gating
        if isinstance(gating, FastWeightLayer):
            raise CheckpointError(f"layer {i} already has a TTT layer attached.")
        if not isinstance(gating, ActivationGating):
            raise CheckpointError(f"layer {i} has no gated MLP to make TTT (found {type(gating).__name__}).")
        layer = InPlaceTTTGating(gating.linear_in, gating.linear_out, gating.activation, cfg, src)
        pre = PREFIX.format(i=i)
        if target_init == "zero":
            layer.target_generator.init_zero()
        else:
            layer.target_generator.init_ntp()
        own = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        expected = {"w_down": layer.w_down, "target_generator.conv1d.conv.weight": layer.target_generator.conv1d.conv.weight,
                    "target_generator.W_target.weight": layer.target_generator.W_target.weight}
        with torch.no_grad():
            for name, dst in expected.items():
                if name in own:
                    val = own[name]
                    if tuple(val.shape) != tuple(dst.shape):
                        raise CheckpointError(f"TTT tensor {pre + name} has shape {tuple(val.shape)}, "
                                              f"layer {i} needs {tuple(dst.shape)} (d={layer.dim}, h={layer.hidden}, "
                                              f"kernel {cfg.conv_kernel_size}).")
                    dst.copy_(val.to(dst.device, torch.float32))
        layers[i].gating = layer
        out[i] = layer
    _forget_streaming_children(lm)
    return out


def ttt_layers(lm: nn.Module) -> dict[int, FastWeightLayer]:
    """{layer index: fast-weight layer} of a moshi LMModel (empty when TTT is off)."""
    tr = getattr(lm, "transformer", None)
    if tr is None:
        return {}
    return {i: l.gating for i, l in enumerate(tr.layers) if isinstance(l.gating, FastWeightLayer)}


def set_ttt_lr(lm: nn.Module, lr: float) -> None:
    """Changes every TTT layer's learning rate (0 freezes fast weights at W0); not while streaming."""
    for layer in ttt_layers(lm).values():
        if layer.is_streaming:
            raise RuntimeError("cannot change the TTT learning rate of a streaming model.")
        layer.lr = float(lr)
