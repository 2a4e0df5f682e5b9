"""Compatibility with the fine-tuning fork (AlufRon/moshi_in_place): its `ttt_config` and tensor names (SPEC §4.3)."""

from __future__ import annotations

from ..errors import ConfigError
from .tensors import TTT_KEY
from ..fastweights.config import TTTConfig

# Defaults of the public fine-tuning fork (AlufRon/moshi_in_place) when a `ttt_config` key is missing.
FORK_DEFAULTS = {"chunk_size": 256, "learning_rate": 1e-3, "conv_kernel_size": 2,
                 "delta_clip_fro_norm": 1e-5, "delta_clip_epsilon": 1e-12,
                 "layer_frequency": 6, "start_layer": 0}
FORK_KEYS = ("enabled", "layer_frequency", "start_layer", "chunk_size", "learning_rate",
             "conv_kernel_size", "delta_clip_fro_norm", "delta_clip_epsilon")


def from_fork_config(fc: dict, num_layers: int) -> TTTConfig | None:
    """Maps the fine-tuning fork's `ttt_config` onto our section (SPEC §4.3); None when disabled."""
    unknown = sorted(set(fc) - set(FORK_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) in the fork's `ttt_config`: {', '.join(unknown)}. "
                          f"Valid keys: {', '.join(FORK_KEYS)}.")
    if not fc.get("enabled", True):
        return None
    g = {**FORK_DEFAULTS, **{k: v for k, v in fc.items() if v is not None}}
    start, freq = int(g["start_layer"]), int(g["layer_frequency"])
    if freq < 1:
        raise ConfigError(f"fork `ttt_config.layer_frequency` must be >= 1, got {freq}.")
    clip = g["delta_clip_fro_norm"]
    return TTTConfig.from_dict({
        "layers": list(range(start, num_layers, freq)),
        "chunk_size": int(g["chunk_size"]), "lr": float(g["learning_rate"]),
        "conv_kernel_size": int(g["conv_kernel_size"]), "conv_padding": "right",
        "target_source": "text",
        "delta_clip_fro_norm": None if clip is None or clip <= 0 else float(clip),
        "delta_clip_epsilon": float(g["delta_clip_epsilon"]),
    }, num_layers)


def normalise_ttt_tensors(raw: dict, lora_scaling: float) -> dict:
    """Fork tensors -> our names: fuse LoRA-wrapped W_target (W + scaling·B·A), drop w_down_pretrained."""
    out = {}
    for k, v in raw.items():
        m = TTT_KEY.match(k)
        i, name = m.group(1), m.group(2)
        base = f"transformer.layers.{i}.gating."
        if name == "w_down_pretrained":
            continue
        if name.startswith("target_generator.W_target.") and name != "target_generator.W_target.weight":
            if name.endswith("frozen_W.weight"):
                pre = k[: -len("frozen_W.weight")]
                a, b = raw.get(pre + "lora_A.weight"), raw.get(pre + "lora_B.weight")
                w = v.float()
                if a is not None and b is not None:
                    w = w + lora_scaling * (b.float() @ a.float())
                out[base + "target_generator.W_target.weight"] = w
            continue
        out[base + name] = v.float()
    return out
