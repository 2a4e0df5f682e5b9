"""Writing TTT tensors and the `ttt` section into a moshi checkpoint directory (SPEC §3.6, §4.2)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..fastweights.config import TTTConfig
from ..io import atomic_write


def ttt_tensors_for(lm, cfg: TTTConfig, target_init: str) -> dict:
    """TTT tensors for every layer of `cfg` by SPEC §3.6, from an LM's `linear_out` weights."""
    import torch
    from ..fastweights.inplace import TargetGenerator, linear_weight
    out = {}
    for i in cfg.layers:
        g = lm.transformer.layers[i].gating
        w = linear_weight(g.linear_out).detach().to("cpu", torch.float32).contiguous()
        tg = TargetGenerator(w.shape[0], cfg.conv_kernel_size, cfg.conv_padding)
        tg.init_zero() if target_init == "zero" else tg.init_ntp()
        pre = f"transformer.layers.{i}.gating."
        out[pre + "w_down"] = w.clone()
        out[pre + "target_generator.conv1d.conv.weight"] = tg.conv1d.conv.weight.detach().contiguous()
        out[pre + "target_generator.W_target.weight"] = tg.W_target.weight.detach().contiguous()
    return out


def add_ttt_to_checkpoint(directory: Path, section: dict, lm, target_init: str = "ntp") -> TTTConfig:
    """Adds a `ttt` section and ttt.safetensors to a moshi checkpoint directory (in place).

    Args:
        directory: a moshi checkpoint directory (config.json and the files it names).
        section: keys of the `ttt` section.
        lm: the directory's LMModel, loaded (its `linear_out` weights become W0).
        target_init: `ntp` or `zero` (SPEC §3.6).
    """
    from safetensors.torch import save_file

    cfg_path = directory / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from None
    num_layers = int(config.get("num_layers", 32))
    cfg = TTTConfig.from_dict({k: v for k, v in section.items()}, num_layers)
    tensors = ttt_tensors_for(lm, cfg, target_init)
    atomic_write(directory / cfg.ttt_name, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config.pop("ttt_config", None)
    config["ttt"] = cfg.to_dict()
    atomic_write(cfg_path, lambda p: p.write_text(json.dumps(config, indent=2)))
    return cfg
