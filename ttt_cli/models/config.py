"""The checkpoint's `ttt` section: where it comes from (ours, the fork's, the default) and `--ttt-layers` syntax."""

from __future__ import annotations

import re

from ..errors import ConfigError
from ..fastweights.config import FastWeightConfig, TTTConfig
from .fork import from_fork_config

DEFAULT_EVERY = 6
DEFAULT_CHUNK = 512


def parse_layers(spec: str, num_layers: int | None = None) -> list[int]:
    """Parses `0,6,12`, `every:6` (from 0), `every:6@3` or `none`; `every:` needs `num_layers`.

    A spec that selects no layer by accident (empty, or `every:` starting past the last layer) is a
    usage error, not a silent TTT-off: `none` says that on purpose.
    """
    s = spec.strip()
    if s == "":
        raise ConfigError("--ttt-layers '': empty. Give 0,6,12, every:6, every:6@3, or none for no TTT layers.")
    m = re.fullmatch(r"every:(\d+)(?:@(\d+))?", s)
    if m:
        if num_layers is None:
            raise ConfigError(f"--ttt-layers {spec!r}: `every:` needs the model's layer count.")
        step, start = int(m.group(1)), int(m.group(2) or 0)
        if step < 1:
            raise ConfigError(f"--ttt-layers {spec!r}: the step must be >= 1.")
        if start >= num_layers:
            raise ConfigError(f"--ttt-layers {spec!r} selects no layer: the model has {num_layers} layers "
                              f"(0..{num_layers - 1}). Start below {num_layers}, or give none for no TTT layers.")
        return list(range(start, num_layers, step))
    if s == "none":
        return []
    try:
        layers = sorted({int(p) for p in s.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"--ttt-layers {spec!r}: expected e.g. `0,6,12`, `every:6`, `every:6@3` or none.") from None
    if not layers:
        raise ConfigError(f"--ttt-layers {spec!r} selects no layer. Give 0,6,12, every:6, every:6@3, or none.")
    return layers


def default_ttt_section(num_layers: int) -> dict:
    """§4.1 default for base checkpoints: every 6th layer from 0, chunk 512, ntp target."""
    return {"layers": list(range(0, num_layers, DEFAULT_EVERY)), "chunk_size": DEFAULT_CHUNK}


def resolve_ttt_config(config: dict, num_layers: int, overrides: dict | None = None,
                       adapters: bool = False) -> tuple[FastWeightConfig | None, str]:
    """The TTT config of a checkpoint: its `ttt` section, the fork's `ttt_config`, or the default.

    Args:
        config: the raw config.json.
        num_layers: the LM's layer count.
        overrides: keys of the `ttt` section to override (`layers` may use `--ttt-layers` syntax).
        adapters: a fork `lora.safetensors` checkpoint (no `ttt_config` then means the fork's fallback).
    Returns (config or None when the fork disables TTT, where it came from).
    """
    if "ttt" in config:
        cfg, origin = FastWeightConfig.from_dict(config["ttt"], num_layers), "ttt"
    elif "ttt_config" in config or adapters:
        cfg, origin = from_fork_config(config, num_layers, adapters).config, "fork"
    else:
        cfg, origin = TTTConfig.from_dict(default_ttt_section(num_layers), num_layers), "default"
    return apply_overrides(cfg, overrides, num_layers), origin


def apply_overrides(cfg: FastWeightConfig | None, overrides: dict | None,
                    num_layers: int) -> FastWeightConfig | None:
    """`cfg` with the given `ttt` keys replaced and validated (None stays None without overrides);
    the keys are checked against the (possibly overridden) variant's own."""
    if not overrides:
        return cfg
    overrides = dict(overrides)
    if isinstance(overrides.get("layers"), str):
        overrides["layers"] = parse_layers(overrides["layers"], num_layers)
    return (cfg or TTTConfig(layers=[])).with_overrides(overrides, num_layers)
