"""The `ttt` config section as the fast-weight layers take it: fields, defaults, validation."""

from __future__ import annotations

import math
import typing as tp
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

VARIANTS = ("inplace",)
PADDINGS = ("right", "center")
TARGET_SOURCES = ("input", "text")
ACTIVATIONS = ("gelu", "silu")  # None: the layer's own gating activation (SPEC §3.1)
TTT_FILE = "ttt.safetensors"


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
    activation: str | None = None
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
        if self.activation is not None and self.activation not in ACTIVATIONS:
            bad(f"activation must be null (the layer's own) or one of {ACTIVATIONS}, got {self.activation!r}.")
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

    def with_overrides(self, overrides: dict | None, num_layers: int | None = None) -> "TTTConfig":
        """Returns a copy with `overrides` (keys of this section) applied and validated."""
        d = self.to_dict()
        d.update(overrides or {})
        return TTTConfig.from_dict(d, num_layers)
