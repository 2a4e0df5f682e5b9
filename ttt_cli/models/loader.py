"""`load_model`: a resolved checkpoint's moshi LM (TTT tensors split out), Mimi and tokenizer, with TTT attached (SPEC §5.0)."""

from __future__ import annotations

import contextlib
import typing as tp
import warnings
from dataclasses import dataclass, field

import torch
from moshi.utils.compile import no_compile

from ..errors import ConfigError, LoadWarning
from ..fastweights.config import FastWeightConfig
from .attaching import attach_from_checkpoint
from .config import apply_overrides, resolve_ttt_config
from .fork import CLIP_WARNING, ForkMapping, from_fork_config
from .resolver import Resolved, checkpoint_info, resolve, yarn_section
from .weights import load_fork_lm, load_lm, random_lm
from .yarn import apply_yarn


@dataclass
class TTTModel:
    """A loaded model: moshi LM with TTT layers attached, Mimi, tokenizer and resolved config."""

    lm: tp.Any
    mimi: tp.Any
    tokenizer: tp.Any
    config: dict
    model_id: str
    info: tp.Any
    device: tp.Any
    dtype: tp.Any
    ttt: FastWeightConfig | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user should know, not a problem (stderr)

    @property
    def is_stt(self) -> bool:
        return self.lm.dep_q == 0

    @property
    def model_type(self) -> str:
        return self.info.model_type

    @property
    def provenance(self) -> dict:
        """Files loaded, where each came from and the mapping applied (also `config["provenance"]`)."""
        return self.config.get("provenance", {})


def resolve_device(device: str | None) -> str:
    """`--device`: auto (cuda when available), cpu, cuda or cuda:N; ConfigError for others or a missing GPU."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: expected auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here. Use --device cpu.")
    return device


def resolve_dtype(dtype: str | None, device: str):
    """`--dtype` as a torch dtype: auto (bf16 on cuda, fp32 on cpu), bf16, fp16 or fp32."""
    dtype = (dtype or "auto").lower()
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in table:
        raise ConfigError(f"--dtype {dtype}: expected auto, bf16, fp16 or fp32.")
    return table[dtype]


_COMPILE_OFF = contextlib.ExitStack()


def disable_compile_on_cpu(device: str) -> None:
    """moshi compiles lazily on first call; on CPU that costs tens of seconds per process (SPEC §2)."""
    if device == "cpu" and not _COMPILE_OFF._exit_callbacks:
        _COMPILE_OFF.enter_context(no_compile())


class _Notes:
    """Warnings of one load: each said once (Python warning + `TTTModel.warnings` for the CLI)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def warn(self, msg: str) -> None:
        if msg not in self.items:
            self.items.append(msg)
            warnings.warn(msg, LoadWarning, stacklevel=3)


def load_model(source: str | None = "tiny", device: str | None = "auto", dtype: str | None = "auto",
               ttt: dict | bool | None = None, target_init: str | None = None,
               base: str | None = None, force: bool = False) -> TTTModel:
    """Loads a checkpoint with TTT attached.

    Args:
        source: preset name, local directory, hub id (SPEC §4.1) or a fine-tuning fork checkpoint
            (its consolidated/ folder, checkpoint_NNNNNN/ folder or lora.safetensors file, §4.3).
        device: auto, cpu or cuda.
        dtype: auto, bf16, fp16 or fp32 (fast weights stay float32 whatever this is).
        ttt: overrides of the `ttt` section (e.g. {"lr": 0}, {"delta_clip_fro_norm": None}), or False
            for plain moshi (no TTT layers).
        target_init: `ntp` or `zero`, for target generators the checkpoint does not provide
            (default: `zero` for fork checkpoints, `ntp` otherwise).
        base: for fork checkpoints, where the files the checkpoint lacks come from (any §4.1 source;
            default kyutai/moshiko-pytorch-bf16).
        force: build a random-weights preset (moshi-7b-*) even where its memory estimate does not fit.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    disable_compile_on_cpu(dev)
    res = resolve(source, base=base)
    info = checkpoint_info(res)
    num_layers = int((info.lm_config or {}).get("num_layers", 32))
    overrides = ttt if isinstance(ttt, dict) else None
    mapping, cfg, origin = _ttt_settings(res, num_layers, ttt, overrides)
    notes = _Notes()
    prov = dict(res.provenance)
    with torch.no_grad():
        lm = _build_lm(res, info, cfg, origin, mapping, target_init, (dev, torch_dtype, force), notes, prov)
    if mapping is not None and mapping.config is not None and cfg is not None and cfg.layers and cfg.rate > 0 \
            and mapping.clip_defaulted and "delta_clip_fro_norm" not in (overrides or {}):
        notes.warn(CLIP_WARNING.format(id=res.model_id))
    mimi = info.get_mimi(device=dev)
    tokenizer = info.get_text_tokenizer()
    config = dict(res.config)
    config.pop("ttt_config", None)
    config["ttt"] = cfg.to_dict() if cfg is not None else None
    config["ttt_origin"] = origin
    prov["ttt_origin"] = origin
    if mapping is not None:
        prov["mapping"] = mapping.to_dict()
    prov["warnings"] = list(notes.items)
    config["provenance"] = prov
    return TTTModel(lm, mimi, tokenizer, config, res.model_id, info, dev, torch_dtype, cfg, notes.items,
                    _fork_note(res))


def _ttt_settings(res: Resolved, num_layers: int, ttt: dict | bool | None,
                  overrides: dict | None) -> tuple[ForkMapping | None, FastWeightConfig | None, str]:
    """(the fork's `ttt_config` mapping or None, the TTT config to attach or None, where it came from:
    off | fork | ttt | default)."""
    mapping = None
    if res.fork is not None:  # needed with TTT off too: which layers' tensors the files may hold
        mapping = from_fork_config(res.config, num_layers, adapters=res.fork.kind == "adapters")
    if ttt is False:
        cfg, origin = None, "off"
    elif mapping is not None:
        cfg, origin = apply_overrides(mapping.config, overrides, num_layers), "fork"
    else:
        cfg, origin = resolve_ttt_config(res.config, num_layers, overrides)
    if origin == "fork" and cfg is not None and not cfg.layers:
        raise ConfigError(f"{res.model_id}: the TTT settings select no layer; give --ttt-layers or --no-ttt.")
    return mapping, cfg, origin


def _build_lm(res: Resolved, info, cfg: FastWeightConfig | None, origin: str, mapping: ForkMapping | None,
              target_init: str | None, how: tuple, notes: _Notes, prov: dict):
    """moshi's LM of the checkpoint with its TTT layers attached and YaRN applied; `how`: (device, dtype, force)."""
    device, dtype, force = how
    if res.fork is not None:
        fork_layers = mapping.config.layers if mapping.config is not None else []
        loaded = load_fork_lm(info, res.fork, fork_layers, device, dtype)
    elif "random_weights" in res.config:
        loaded = random_lm(res, info, device, dtype, force)
    else:
        loaded = load_lm(info, device, dtype)
    prov.update(loaded.notes)
    if cfg is not None and cfg.layers:
        attach_from_checkpoint(loaded.lm, res, cfg, origin, loaded, target_init, mapping, notes.warn, prov)
    yarn = yarn_section(res.config)
    if yarn is not None:
        prov["yarn"] = apply_yarn(loaded.lm, yarn)
    return loaded.lm


def _fork_note(res: Resolved) -> list[str]:
    """One line saying which of a fork checkpoint's files came from where."""
    if res.fork is None:
        return []
    where = res.provenance.get("from", {})
    names = {"moshi": "LM weights", "mimi": "Mimi", "tokenizer": "tokenizer", "mimi_config": "Mimi config"}
    parts = [f"{names[k]} from {v}" for k, v in where.items()]
    step = f", step {res.fork.step}" if res.fork.step is not None else ""
    unused = (f" Its folder holds every file its config.json names, so --base {res.unused_base} was not used."
              if res.unused_base else "")
    return [f"fine-tuning fork checkpoint ({res.fork.weights.name}{step}): {'; '.join(parts)}.{unused}"]
