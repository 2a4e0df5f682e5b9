"""Writing TTT tensors and the `ttt` section into a moshi checkpoint directory (SPEC §3.6, §4.2)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..errors import CheckpointError
from ..fastweights.attach import variant_of
from ..fastweights.config import FastWeightConfig
from ..io import atomic_write


def ttt_tensors_for(lm, cfg: FastWeightConfig, target_init: str) -> dict:
    """TTT tensors for every layer of `cfg` with the variant's documented fresh init (In-Place: SPEC §3.6,
    from the LM's `linear_out` weights; `mlp` §3.10; `linear-adapter` §3.11)."""
    return variant_of(cfg).fresh_tensors(lm, cfg, target_init)


def add_ttt_to_checkpoint(directory: Path, section: dict, lm, target_init: str = "ntp",
                          tensors: dict | None = None) -> FastWeightConfig:
    """Adds a `ttt` section and ttt.safetensors to a moshi checkpoint directory (in place).

    Args:
        directory: a moshi checkpoint directory (config.json and the files it names).
        section: keys of the `ttt` section.
        lm: the directory's LMModel, loaded (In-Place: its `linear_out` weights become W0).
        target_init: In-Place: `ntp` or `zero` (SPEC §3.6).
        tensors: the TTT tensors to write (default: the variant's fresh init).
    """
    cfg_path = directory / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from None
    num_layers = int(config.get("num_layers", 32))
    cfg = FastWeightConfig.from_dict({k: v for k, v in section.items()}, num_layers)
    if tensors is None:
        tensors = ttt_tensors_for(lm, cfg, target_init)
    atomic_write(directory / cfg.ttt_name, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config.pop("ttt_config", None)
    config["ttt"] = cfg.to_dict()
    atomic_write(cfg_path, lambda p: p.write_text(json.dumps(config, indent=2)))
    return cfg
