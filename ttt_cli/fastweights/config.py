"""The `ttt` config section as the fast-weight layers take it: one dataclass per variant, defaults, validation."""

from __future__ import annotations

import math
import typing as tp
from dataclasses import asdict, dataclass, field, fields

from ..errors import ConfigError

PADDINGS = ("right", "center")
TARGET_SOURCES = ("input", "text")
ACTIVATIONS = ("gelu", "silu")  # None: the layer's own gating activation (SPEC §3.1)
TTT_FILE = "ttt.safetensors"
ADAPTER_TARGETS = ("self_attn.in_projs.0", "self_attn.out_projs.0", "gating.linear_in", "gating.linear_out")


def _number(bad, name: str, v, minimum: float = 0.0, strict: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (v <= minimum if strict else v < minimum):
        bad(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {v!r}.")
    return float(v)


@dataclass
class FastWeightConfig:
    """Keys every variant's `ttt` section has (SPEC §3.9); subclasses add their own.

    Class attributes a variant sets: `rate_key` (the key `--ttt-lr` sets, 0 = TTT off),
    `structural_keys` (keys that change what the layer computes or the meaning of its snapshot
    tensors: a snapshot taken with other values is never restored) and `hyper_keys` (update-rule
    rates: a snapshot taken with other values still continues a well-defined stream, `--force-state`).
    """

    variant: str = "inplace"
    layers: list[int] = field(default_factory=list)
    chunk_size: int = 512
    ttt_name: str = TTT_FILE

    rate_key: tp.ClassVar[str] = "lr"
    structural_keys: tp.ClassVar[tuple[str, ...]] = ("chunk_size",)
    hyper_keys: tp.ClassVar[tuple[str, ...]] = ()

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def valid_keys(cls) -> list[str]:
        """The section's keys, `ttt_name` last (as SPEC §4.2 writes them)."""
        names = [f.name for f in fields(cls) if f.name != "ttt_name"]
        return names + ["ttt_name"]

    @staticmethod
    def from_dict(d: dict, num_layers: int | None = None) -> "FastWeightConfig":
        """Builds and validates the config of `d["variant"]` (default `inplace`).

        Unknown keys are an error that lists the valid keys of that variant.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"the `ttt` config section must be a JSON object, got {type(d).__name__}.")
        cls = config_class(d.get("variant", "inplace"))
        unknown = sorted(set(d) - set(cls.valid_keys()))
        if unknown:
            raise ConfigError(
                f"unknown key(s) in the `ttt` config section of variant {cls.variant_name()!r}: {', '.join(unknown)}. "
                f"Valid keys: {', '.join(cls.valid_keys())}.")
        cfg = cls(**{**d, "variant": cls.variant_name()})
        cfg.validate(num_layers)
        return cfg

    @classmethod
    def variant_name(cls) -> str:
        return cls.__dataclass_fields__["variant"].default

    def with_overrides(self, overrides: dict | None, num_layers: int | None = None) -> "FastWeightConfig":
        """A copy with `overrides` applied and validated.

        `lr` is accepted for every variant and sets its rate (`rate_key`), so `{"lr": 0}` and
        `--ttt-lr` mean the same everywhere. A `variant` override switches variant: `layers` and
        `ttt_name` are kept, every other key takes the new variant's default unless overridden.
        """
        ov = dict(overrides or {})
        target = config_class(ov.get("variant", self.variant))
        if target is type(self):
            d = self.to_dict()
        else:
            d = {"variant": target.variant_name(), "layers": list(self.layers), "ttt_name": self.ttt_name}
        if "lr" in ov and "lr" not in target.valid_keys():
            ov[target.rate_key] = ov.pop("lr")
        unknown = sorted(set(ov) - set(target.valid_keys()))
        if unknown:
            raise ConfigError(f"unknown TTT override(s) for variant {target.variant_name()!r}: {', '.join(unknown)}. "
                              f"Valid keys: {', '.join(target.valid_keys())} (and `lr`, the variant's rate).")
        d.update(ov)
        return FastWeightConfig.from_dict(d, num_layers)

    # -- checking ---------------------------------------------------------------------------------
    def validate(self, num_layers: int | None = None) -> None:
        def bad(msg: str) -> tp.NoReturn:
            raise ConfigError(f"invalid `ttt` config: {msg}")
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
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            bad(f"chunk_size must be a positive integer, got {self.chunk_size!r}.")
        if not isinstance(self.ttt_name, str) or not self.ttt_name:
            bad("ttt_name must be a file name.")
        self.validate_variant(bad)

    def validate_variant(self, bad: tp.Callable[[str], tp.NoReturn]) -> None:
        """The variant's own checks (and normalisation of its values)."""

    # -- reading ----------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """The variant's learning rate (`lr`, `base_lr` or `lr_scale`): 0 = TTT off."""
        return float(getattr(self, self.rate_key))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in self.valid_keys()}


@dataclass
class TTTConfig(FastWeightConfig):
    """In-Place TTT's `ttt` section (SPEC §4.2)."""

    variant: str = "inplace"
    chunk_size: int = 512
    lr: float = 1e-3
    conv_kernel_size: int = 2
    conv_padding: str = "right"
    target_source: str = "input"
    activation: str | None = None
    delta_clip_fro_norm: float | None = None
    delta_clip_epsilon: float = 1e-12

    rate_key: tp.ClassVar[str] = "lr"
    structural_keys: tp.ClassVar[tuple[str, ...]] = ("chunk_size", "conv_kernel_size", "conv_padding", "target_source",
                                                          "activation")
    hyper_keys: tp.ClassVar[tuple[str, ...]] = ("lr", "delta_clip_fro_norm", "delta_clip_epsilon")

    def validate_variant(self, bad) -> None:
        self.lr = _number(bad, "lr", self.lr)
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


@dataclass
class MLPConfig(FastWeightConfig):
    """Variant `mlp`: TTT-MLP hybrid blocks between attention and feed-forward (SPEC §3.10)."""

    variant: str = "mlp"
    chunk_size: int = 32
    num_heads: int | None = None  # None: the layer's attention heads (resolved when attached)
    base_lr: float = 1.0
    gating_alpha_init: float = 0.05

    rate_key: tp.ClassVar[str] = "base_lr"
    structural_keys: tp.ClassVar[tuple[str, ...]] = ("chunk_size", "num_heads")
    hyper_keys: tp.ClassVar[tuple[str, ...]] = ("base_lr",)

    def validate_variant(self, bad) -> None:
        if self.num_heads is not None and (not isinstance(self.num_heads, int) or isinstance(self.num_heads, bool)
                                           or self.num_heads < 1):
            bad(f"num_heads must be a positive integer or null, got {self.num_heads!r}.")
        self.base_lr = _number(bad, "base_lr", self.base_lr)
        self.gating_alpha_init = _number(bad, "gating_alpha_init", self.gating_alpha_init, -math.inf)


@dataclass
class AdapterConfig(FastWeightConfig):
    """Variant `linear-adapter`: TTT-Linear adapters beside chosen linears (SPEC §3.11)."""

    variant: str = "linear-adapter"
    chunk_size: int = 8
    targets: list[str] = field(default_factory=lambda: list(ADAPTER_TARGETS))
    rank: int = 32
    scale: float = 1.0
    lr_scale: float = 1.0

    rate_key: tp.ClassVar[str] = "lr_scale"
    structural_keys: tp.ClassVar[tuple[str, ...]] = ("chunk_size", "targets", "rank", "scale")
    hyper_keys: tp.ClassVar[tuple[str, ...]] = ("lr_scale",)

    def validate_variant(self, bad) -> None:
        if not isinstance(self.targets, list) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            bad(f"targets must be a non-empty list of module names, got {self.targets!r}.")
        unknown = [t for t in self.targets if t not in ADAPTER_TARGETS]
        if unknown:
            bad(f"targets {unknown} are not adaptable linears; choose among {', '.join(ADAPTER_TARGETS)}.")
        if len(set(self.targets)) != len(self.targets):
            bad(f"targets has duplicates: {self.targets}.")
        self.targets = [t for t in ADAPTER_TARGETS if t in self.targets]  # canonical order
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            bad(f"rank must be a positive integer, got {self.rank!r}.")
        self.scale = _number(bad, "scale", self.scale, -math.inf)
        self.lr_scale = _number(bad, "lr_scale", self.lr_scale)


CONFIGS: dict[str, type[FastWeightConfig]] = {c.variant_name(): c for c in (TTTConfig, MLPConfig, AdapterConfig)}
VARIANTS = tuple(CONFIGS)


def config_class(variant: tp.Any) -> type[FastWeightConfig]:
    """The config dataclass of a variant name; unknown names are a ConfigError listing the known ones."""
    if variant not in CONFIGS:
        raise ConfigError(f"invalid `ttt` config: variant {variant!r} is not supported "
                          f"(supported: {', '.join(VARIANTS)}).")
    return CONFIGS[variant]


def all_config_keys() -> list[str]:
    """Every key any variant's section may hold (snapshot metadata, diffs)."""
    keys: list[str] = []
    for c in CONFIGS.values():
        keys += [k for k in c.valid_keys() if k not in keys]
    return keys
