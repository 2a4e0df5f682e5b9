"""Attaching fast-weight layers to a moshi `LMModel`: one registry of variants, `ttt_layers`, `set_ttt_lr`."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
from torch import nn

from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule

from . import adapter, mlp
from .config import FastWeightConfig, TTTConfig
from ..errors import CheckpointError
from .interface import FastWeightLayer
from .inplace import InPlaceTTTGating, TargetGenerator, X0Source, linear_weight

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


def _attach_inplace(lm: LMModel, cfg: TTTConfig, tensors: dict[str, torch.Tensor],
                    target_init: str = "ntp") -> dict[int, FastWeightLayer]:
    """Replaces `lm.transformer.layers[i].gating` with In-Place TTT for every i in `cfg.layers`."""
    layers = lm.transformer.layers
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
    return out


def _inplace_tensor_names(cfg: TTTConfig) -> list[str]:
    return [PREFIX.format(i=i) + n for i in cfg.layers for n in TTT_TENSORS]


def _inplace_fresh_tensors(lm: LMModel, cfg: TTTConfig, target_init: str = "ntp") -> dict[str, torch.Tensor]:
    """SPEC §3.6: w_down <- linear_out (float32), target generator `ntp` or `zero`."""
    out = {}
    for i in cfg.layers:
        g = lm.transformer.layers[i].gating
        w = linear_weight(g.linear_out).detach().to("cpu", torch.float32).contiguous()
        tg = TargetGenerator(w.shape[0], cfg.conv_kernel_size, cfg.conv_padding)
        tg.init_zero() if target_init == "zero" else tg.init_ntp()
        pre = PREFIX.format(i=i)
        out[pre + "w_down"] = w.clone()
        out[pre + "target_generator.conv1d.conv.weight"] = tg.conv1d.conv.weight.detach().contiguous()
        out[pre + "target_generator.W_target.weight"] = tg.W_target.weight.detach().contiguous()
    return out


def _inplace_fresh_note(cfg: TTTConfig, target_init: str = "ntp") -> str:
    return f"initialised by SPEC §3.6 (w_down <- linear_out, target {target_init})"


@dataclass(frozen=True)
class Variant:
    """What loading and writing checkpoints need from a variant (the only place variants are listed)."""

    attach: tp.Callable[..., dict[int, FastWeightLayer]]          # (lm, cfg, tensors, target_init)
    tensor_names: tp.Callable[[tp.Any], list[str]]                # checkpoint tensors of a config
    fresh_tensors: tp.Callable[..., dict[str, torch.Tensor]]      # (lm, cfg, target_init): documented fresh init
    fresh_note: tp.Callable[..., str]                             # (cfg, target_init): how missing tensors are made


VARIANTS: dict[str, Variant] = {
    "inplace": Variant(_attach_inplace, _inplace_tensor_names, _inplace_fresh_tensors, _inplace_fresh_note),
    "mlp": Variant(mlp.attach, mlp.tensor_names, mlp.fresh_tensors, mlp.fresh_note),
    "linear-adapter": Variant(adapter.attach, adapter.tensor_names, adapter.fresh_tensors, adapter.fresh_note),
}


def variant_of(cfg: FastWeightConfig) -> Variant:
    return VARIANTS[cfg.variant]


def attach_ttt(lm: LMModel, cfg: FastWeightConfig, tensors: dict[str, torch.Tensor] | None = None,
               target_init: str = "ntp") -> dict[int, FastWeightLayer]:
    """Attaches the fast-weight layers of `cfg` (any variant) to the layers it names.

    Args:
        lm: a moshi LMModel with its weights loaded.
        cfg: the validated `ttt` section.
        tensors: TTT tensors with checkpoint key names (In-Place `transformer.layers.{i}.gating.w_down`, ...;
            SPEC §3.10/§3.11 for the variants); missing ones get the variant's documented fresh init.
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
