"""The `ttt` config section: validation, defaults, overrides and the fine-tuning fork's format."""

from __future__ import annotations

import json
import math
import re
import typing as tp
from dataclasses import asdict, dataclass, field

from .errors import ConfigError

FRAME_RATE = 12.5  # Mimi frames (LM steps) per second.
VARIANTS = ("inplace",)
PADDINGS = ("right", "center")
TARGET_SOURCES = ("input", "text")
TTT_FILE = "ttt.safetensors"
# Defaults of the public fine-tuning fork (AlufRon/moshi_in_place) when a `ttt_config` key is missing.
FORK_DEFAULTS = {"chunk_size": 256, "learning_rate": 1e-3, "conv_kernel_size": 2,
                 "delta_clip_fro_norm": 1e-5, "delta_clip_epsilon": 1e-12,
                 "layer_frequency": 6, "start_layer": 0}
FORK_KEYS = ("enabled", "layer_frequency", "start_layer", "chunk_size", "learning_rate",
             "conv_kernel_size", "delta_clip_fro_norm", "delta_clip_epsilon")


@dataclass
class TTTConfig:
    """The resolved `ttt` section of a checkpoint's config.json (SPEC §4.2)."""

    variant: str = "inplace"
    layers: list[int] = field(default_factory=list)
    chunk_size: int = 512
    lr: float = 1e-3
    conv_kernel_size: int = 2
    conv_padding: str = "right"
    target_source: str = "input"
    delta_clip_fro_norm: float | None = None
    delta_clip_epsilon: float = 1e-12
    ttt_name: str = TTT_FILE

    @classmethod
    def valid_keys(cls) -> list[str]:
        return list(cls.__dataclass_fields__)

    @classmethod
    def from_dict(cls, d: dict, num_layers: int | None = None) -> "TTTConfig":
        """Builds and validates a config; unknown keys are an error that lists the valid ones."""
        if not isinstance(d, dict):
            raise ConfigError(f"the `ttt` config section must be a JSON object, got {type(d).__name__}.")
        unknown = sorted(set(d) - set(cls.valid_keys()))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in the `ttt` config section: {', '.join(unknown)}. "
                f"Valid keys: {', '.join(cls.valid_keys())}.")
        cfg = cls(**d)
        cfg.validate(num_layers)
        return cfg

    def validate(self, num_layers: int | None = None) -> None:
        def bad(msg: str) -> tp.NoReturn:
            raise ConfigError(f"invalid `ttt` config: {msg}")
        if self.variant not in VARIANTS:
            bad(f"variant {self.variant!r} is not supported (supported: {', '.join(VARIANTS)}).")
        if not isinstance(self.layers, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in self.layers):
            bad(f"layers must be a list of integers, got {self.layers!r}.")
        if len(set(self.layers)) != len(self.layers):
            bad(f"layers has duplicates: {self.layers}.")
        self.layers = sorted(self.layers)
        if num_layers is not None:
            out = [i for i in self.layers if not 0 <= i < num_layers]
            if out:
                bad(f"layers {out} do not exist: the model has {num_layers} layers (0..{num_layers - 1}).")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            bad(f"chunk_size must be a positive integer, got {self.chunk_size!r}.")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr < 0:
            bad(f"lr must be a finite number >= 0, got {self.lr!r}.")
        self.lr = float(self.lr)
        if not isinstance(self.conv_kernel_size, int) or self.conv_kernel_size < 1:
            bad(f"conv_kernel_size must be a positive integer, got {self.conv_kernel_size!r}.")
        if self.conv_padding not in PADDINGS:
            bad(f"conv_padding must be one of {PADDINGS}, got {self.conv_padding!r}.")
        if self.target_source not in TARGET_SOURCES:
            bad(f"target_source must be one of {TARGET_SOURCES}, got {self.target_source!r}.")
        if self.delta_clip_fro_norm is not None:
            if not isinstance(self.delta_clip_fro_norm, (int, float)) or self.delta_clip_fro_norm <= 0:
                bad(f"delta_clip_fro_norm must be a number > 0 or null, got {self.delta_clip_fro_norm!r}.")
            self.delta_clip_fro_norm = float(self.delta_clip_fro_norm)
        if not isinstance(self.delta_clip_epsilon, (int, float)) or self.delta_clip_epsilon <= 0:
            bad(f"delta_clip_epsilon must be a number > 0, got {self.delta_clip_epsilon!r}.")
        if not isinstance(self.ttt_name, str) or not self.ttt_name:
            bad("ttt_name must be a file name.")

    def to_dict(self) -> dict:
        return asdict(self)

    def canonical_json(self) -> str:
        """Canonical JSON of what changes the math (used in fingerprints); `ttt_name` excluded."""
        d = self.to_dict()
        d.pop("ttt_name")
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def with_overrides(self, overrides: dict | None, num_layers: int | None = None) -> "TTTConfig":
        """Returns a copy with `overrides` (keys of this section) applied and validated."""
        d = self.to_dict()
        d.update(overrides or {})
        return TTTConfig.from_dict(d, num_layers)


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


def parse_layers(spec: str, num_layers: int | None = None) -> list[int]:
    """Parses `0,6,12`, `every:6` (from 0) or `every:6@3`; `every:` needs `num_layers`."""
    s = spec.strip()
    m = re.fullmatch(r"every:(\d+)(?:@(\d+))?", s)
    if m:
        if num_layers is None:
            raise ConfigError(f"--ttt-layers {spec!r}: `every:` needs the model's layer count.")
        step, start = int(m.group(1)), int(m.group(2) or 0)
        if step < 1:
            raise ConfigError(f"--ttt-layers {spec!r}: the step must be >= 1.")
        return list(range(start, num_layers, step))
    if s in ("", "none"):
        return []
    try:
        return sorted({int(p) for p in s.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"--ttt-layers {spec!r}: expected e.g. `0,6,12`, `every:6` or `every:6@3`.") from None


def parse_seconds(text: str) -> float:
    """Parses a time: `1.5`, `30s`, `2m`, `1h` -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not m:
        raise ConfigError(f"cannot read the time {text!r}: expected e.g. `1.5`, `30s`, `2m`.")
    mult = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
    return float(m.group(1)) * mult


def seconds_to_steps(seconds: float) -> int:
    """SPEC §5: seconds become steps as round(seconds x 12.5)."""
    return int(round(seconds * FRAME_RATE))
