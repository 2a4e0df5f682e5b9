"""Checkpoints of the fine-tuning fork (AlufRon/moshi_in_place, `moshi-finetune`): layout, config, tensors (SPEC §4.3)."""

from __future__ import annotations

import re
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..fastweights.config import TTTConfig
from ..fastweights.inplace import TENSOR_NAMES, W_TARGET, checkpoint_key

CONSOLIDATED = "consolidated.safetensors"   # full fine-tuning, or `save_adapters: false` (merged)
ADAPTERS = "lora.safetensors"               # LoRA and/or TTT-only training (`save_adapters: true`)
STEP_DIR = re.compile(r"^checkpoint_(\d+)$")

# The fork's TTTGating defaults for keys its `ttt_config` lacks.
FORK_DEFAULTS = {"chunk_size": 256, "learning_rate": 1e-3, "conv_kernel_size": 2,
                 "delta_clip_fro_norm": 1e-5, "delta_clip_epsilon": 1e-12,
                 "layer_frequency": 6, "start_layer": 0}
FORK_KEYS = ("enabled", "layer_frequency", "start_layer", "chunk_size", "learning_rate",
             "conv_kernel_size", "delta_clip_fro_norm", "delta_clip_epsilon")
# What the fork's run_inference assumes for a `lora.safetensors` whose config has no `ttt_config`.
INFERENCE_FALLBACK = {"enabled": True, "layer_frequency": 10, "start_layer": 10, "chunk_size": 256,
                      "learning_rate": 1e-3, "conv_kernel_size": 2}
CLIP_WARNING = ("{id}: the fork's trainer never passed a clip to its TTT layers, so every checkpoint it wrote was "
                "trained with its default delta clip 1e-5 (with lr <= 1e-3 each update is <= 1e-8: TTT is "
                "effectively off). This run reproduces that; pass --ttt-clip none (or a number) to try it otherwise.")


@dataclass
class ForkLayout:
    """Where a fork checkpoint's files are."""

    folder: Path   # the `consolidated/` folder (config.json + one weights file)
    weights: Path  # consolidated.safetensors or lora.safetensors
    step: int | None = None

    @property
    def kind(self) -> str:
        return "consolidated" if self.weights.name == CONSOLIDATED else "adapters"


def _steps(checkpoints: Path) -> list[tuple[int, Path]]:
    out = []
    for d in checkpoints.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)


def _refuse_run_dir(p: Path, checkpoints: Path) -> tp.NoReturn:
    steps = _steps(checkpoints)
    if not steps:
        raise CheckpointError(f"--model {p}: a fine-tuning run folder without checkpoints ({checkpoints} holds no "
                              f"checkpoint_NNNNNN/ folder).")
    last = steps[-1][1] / "consolidated"
    raise CheckpointError(f"--model {p} is a fine-tuning run, not one checkpoint: it holds step(s) "
                          f"{', '.join(str(s) for s, _ in steps)}. Pass one checkpoint, e.g. the last: --model {last}")


def is_fork_config(cfg: dict) -> bool:
    """The fork's config: a `ttt_config` whatever file keys a user added to it (`lora_name`, `moshi_name`, as
    moshi's own loader needs), or the `lora` key its trainer always writes without moshi's `lora_name`
    (its inference's fallback). Ours has a `ttt` section, which wins (SPEC §4.3)."""
    if "ttt" in cfg:
        return False
    return "ttt_config" in cfg or ("lora" in cfg and "lora_name" not in cfg)


def find_fork_layout(p: Path) -> ForkLayout | None:
    """The fork layout at `p` (a consolidated/ folder, its checkpoint_NNNNNN/ parent or the weights file).

    Returns None where no such file is; refuses a run folder (`RUN/`, `RUN/checkpoints/`) with the steps
    found. Whether the config is the fork's is `is_fork_config`'s call.
    """
    if p.is_file():
        if p.name in (CONSOLIDATED, ADAPTERS) and (p.parent / "config.json").exists():
            return ForkLayout(p.parent, p, _step_of(p.parent))
        return None
    if (p / "checkpoints").is_dir() and _steps(p / "checkpoints"):
        _refuse_run_dir(p, p / "checkpoints")
    if not (p / "config.json").exists() and _steps(p):
        _refuse_run_dir(p, p)
    if (p / "consolidated").is_dir() and not (p / "config.json").exists():
        p = p / "consolidated"
    present = [p / n for n in (CONSOLIDATED, ADAPTERS) if (p / n).exists()]
    if not present or not (p / "config.json").exists():
        return None
    if len(present) > 1:
        raise CheckpointError(f"--model {p}: the folder holds both {CONSOLIDATED} and {ADAPTERS}; pass the one "
                              f"to load (--model {present[0]} or --model {present[1]}).")
    return ForkLayout(p, present[0], _step_of(p))


# config.json keys that name a file, by role: (key, what it is in messages).
FILE_ROLES = {"moshi": ("moshi_name", "LM weights"), "mimi": ("mimi_name", "Mimi weights"),
              "tokenizer": ("tokenizer_name", "tokenizer"), "mimi_config": ("mimi_config_name", "Mimi config")}


@dataclass
class FolderFiles:
    """What a fork checkpoint's folder provides of the files its config.json names (SPEC §4.3)."""

    found: dict[str, tuple[Path, str]]   # role -> (path, "checkpoint folder" | "the path config.json names")
    missing: list[str]                   # what it lacks, in words: which file and where it was looked for


def folder_files(cfg: dict, layout: ForkLayout) -> FolderFiles:
    """The files a fork checkpoint's config names that are there, and those it lacks (SPEC §4.3).

    A name is looked up in the checkpoint's own folder (`consolidated/`) by its file name, then, for an
    absolute or `file://` name, at that path (a run trained on another machine names files there). The LM weights of a full fine-tuning checkpoint are its consolidated.safetensors whatever
    `moshi_name` says; a Mimi config the config does not name is not missing (moshi's default, or the base's
    when a base is used for other files).

    Args:
        cfg: the checkpoint's config.json.
        layout: where its folder and weights file are.
    """
    found: dict[str, tuple[Path, str]] = {}
    missing: list[str] = []
    for role, (key, what) in FILE_ROLES.items():
        if role == "moshi" and layout.kind == "consolidated":
            continue
        name = cfg.get(key)
        if not isinstance(name, str) or not name:
            if role != "mimi_config":
                missing.append(f"the {what} (config.json names no `{key}`)")
            continue
        named = Path(name.removeprefix("file://"))
        places = [(layout.folder / named.name, "checkpoint folder")]  # the folder first, whatever the name's path
        if name.startswith("file://") or named.is_absolute():
            places.append((named, "the path config.json names"))
        hit = next(((p, where) for p, where in places if p.is_file()), None)
        if hit is not None:
            found[role] = hit
        else:
            missing.append(f"the {what} (`{key}`: {name}; looked for {' and '.join(str(p) for p, _ in places)})")
    return FolderFiles(found, missing)


def _step_of(folder: Path) -> int | None:
    m = STEP_DIR.match(folder.parent.name) if folder.name == "consolidated" else STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else None


@dataclass
class ForkMapping:
    """The fork's `ttt_config` mapped onto our `ttt` section, and what was assumed."""

    config: TTTConfig | None
    source: str                      # "ttt_config" | "inference fallback (no ttt_config)" | "none"
    selection: dict                  # {"start_layer": s, "layer_frequency": f}
    clip_defaulted: bool             # no clip key: the fork's 1e-5 applies (warn)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ttt_source": self.source, **self.selection, "clip_defaulted": self.clip_defaulted,
                "lr_from": "learning_rate", "activation": "gelu (the fork's TTT layers: exact erf GELU)",
                "target_source": "input (sum of token embeddings, no condition)", "conv_padding": "right"}


def from_fork_config(raw: dict, num_layers: int, adapters: bool = False) -> ForkMapping:
    """Maps a fork config.json's `ttt_config` onto our section (SPEC §4.3).

    Args:
        raw: the fork checkpoint's whole config.json.
        num_layers: the LM's layer count.
        adapters: the checkpoint is a `lora.safetensors` one (gets the inference fallback without ttt_config).
    """
    fc = raw.get("ttt_config")
    source = "ttt_config"
    if fc is None:
        if not adapters:
            return ForkMapping(None, "none", {}, False)
        fc, source = dict(INFERENCE_FALLBACK), "inference fallback (no ttt_config)"
    if not isinstance(fc, dict):
        raise ConfigError(f"the fork's `ttt_config` must be a JSON object, got {type(fc).__name__}.")
    unknown = sorted(set(fc) - set(FORK_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) in the fork's `ttt_config`: {', '.join(unknown)}. "
                          f"Valid keys: {', '.join(FORK_KEYS)}.")
    if not fc.get("enabled", True):
        return ForkMapping(None, source + " (enabled: false)", {}, False)
    g = {**FORK_DEFAULTS, **{k: v for k, v in fc.items() if k != "delta_clip_fro_norm" and v is not None}}
    try:
        start, freq = int(g["start_layer"]), int(g["layer_frequency"])
    except (TypeError, ValueError):
        raise ConfigError(f"fork `ttt_config`: start_layer / layer_frequency must be integers, got "
                          f"{g['start_layer']!r} / {g['layer_frequency']!r}.") from None
    if freq < 1 or start < 0:
        raise ConfigError(f"fork `ttt_config`: layer_frequency must be >= 1 and start_layer >= 0, got {freq} / {start}.")
    if start >= num_layers:
        raise CheckpointError(f"the fork's {source} selects TTT layers from {start} every {freq}, but the base model "
                              f"has {num_layers} layers (0..{num_layers - 1}): this checkpoint was trained on another "
                              f"base. Pass that one with --base.")
    # The fork's semantics: an absent key means its default 1e-5; null or <= 0 means no clip.
    clip_defaulted = "delta_clip_fro_norm" not in fc
    clip = FORK_DEFAULTS["delta_clip_fro_norm"] if clip_defaulted else fc["delta_clip_fro_norm"]
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))):
        raise ConfigError(f"fork `ttt_config.delta_clip_fro_norm` must be a number or null, got {clip!r}.")
    cfg = TTTConfig.from_dict({
        "layers": list(range(start, num_layers, freq)),
        "chunk_size": g["chunk_size"], "lr": g["learning_rate"],
        "conv_kernel_size": g["conv_kernel_size"], "conv_padding": "right",
        "target_source": "input", "activation": "gelu",
        "delta_clip_fro_norm": None if clip is None or clip <= 0 else float(clip),
        "delta_clip_epsilon": float(g["delta_clip_epsilon"]),
    }, num_layers)
    return ForkMapping(cfg, source, {"start_layer": start, "layer_frequency": freq}, clip_defaulted)


# -- tensors ----------------------------------------------------------------------------------------
# The fork's own names for In-Place tensors (SPEC §4.3), beside ours: a copy of W0 it keeps (ignored), and
# W_target wrapped in LoRA (fused into our W_target on load).
FORK_W0 = "w_down_pretrained"
LORA_W_TARGET = tuple(f"{W_TARGET}.{part}.weight" for part in ("frozen_W", "lora_A", "lora_B"))
_W_TARGET = f"{W_TARGET}.weight"  # ours, what the LoRA pair is fused into


def fork_tensor_shape(name: str, dim: int, hidden: int) -> tuple[int, ...] | None:
    """The shape a tensor the fork names (name after `gating.`) must have; None for a LoRA factor (rank free)
    and for names that are not the fork's own."""
    return {FORK_W0: (dim, hidden), LORA_W_TARGET[0]: (dim, dim)}.get(name)


def normalise_ttt_tensors(by_layer: dict[int, dict[str, tuple[str, tp.Any]]], layers: list[int] | None, file: Path,
                          lora_scaling: float) -> tuple[dict, dict]:
    """TTT tensors as stored (ours or the fork's names, any float dtype) -> our names in float32.

    `w_down_pretrained` is ignored; a LoRA-wrapped `W_target` (`frozen_W` + `lora_A` + `lora_B`) is fused
    as W + scaling·B·A, like moshi's LoRA merge (SPEC §4.3).

    Args:
        by_layer: {layer: {name after `gating.`: (key, tensor)}} read from `file` (`tensors.by_layer`).
        layers: the layers the checkpoint's config selects; tensors of other layers are refused (the
            file and the config disagree). None: no such check (our layout, where `--ttt-layers` may
            pick a subset of what ttt.safetensors holds).
        file: where they came from, for messages and provenance.
        lora_scaling: the config's `lora_scaling`.
    Returns:
        (tensors with our key names, {our key: "file:key it came from"}).
    """
    out: dict = {}
    origin: dict = {}
    stray = sorted(set(by_layer) - set(layers)) if layers is not None else []
    if stray:
        keys = [by_layer[i][n][0] for i in stray for n in by_layer[i]][:3]
        raise CheckpointError(f"{file} holds TTT tensors for layer(s) {stray} ({', '.join(keys)} ...), which the "
                              f"config's ttt_config does not select (layers {layers}): the file and its config.json "
                              f"disagree.")
    for i, named in sorted(by_layer.items()):
        plain = {n: kv for n, kv in named.items() if n in TENSOR_NAMES}
        for n, (k, v) in plain.items():
            out[checkpoint_key(i, n)] = v.float()
            origin[checkpoint_key(i, n)] = f"{file.name}:{k}"
        lora = [named.get(n) for n in LORA_W_TARGET]
        if any(x is not None for x in lora) and _W_TARGET not in plain:
            if any(x is None for x in lora):
                have = [n for n, x in zip(LORA_W_TARGET, lora) if x is not None]
                raise CheckpointError(f"{file}: layer {i}'s LoRA-wrapped W_target is incomplete (has "
                                      f"{', '.join(have)}; needs frozen_W, lora_A and lora_B).")
            (kw, w), (ka, a), (kb, b) = lora
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{file}: {ka} {tuple(a.shape)} and {kb} {tuple(b.shape)} are not a LoRA pair.")
            with torch.no_grad():
                out[checkpoint_key(i, _W_TARGET)] = w.float() + lora_scaling * (b.float() @ a.float())
            origin[checkpoint_key(i, _W_TARGET)] = f"{file.name}:{kw} + {lora_scaling}·lora_B·lora_A (fused)"
    return out, origin
