"""moshi's LM built from a checkpoint's weights files (ours, moshi's, the fork's, or drawn at random), TTT tensors split out."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

import torch
from moshi.models.loaders import get_lora_moshi, get_moshi_lm
from moshi.modules.lora import LoRALinear
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError
from ..fastweights.attach import attach_ttt
from ..fastweights.config import FastWeightConfig
from ..fastweights.inplace import checkpoint_key
from .fork import ForkLayout
from . import presets
from .resolver import Resolved
from .tensors import safetensors_keys, split_ttt, ttt_key


@dataclass
class LoadedLM:
    """What building the LM produced: the LM, the raw TTT tensors read and where from."""

    lm: tp.Any
    ttt: dict = field(default_factory=dict)        # {key: tensor} as stored (any dtype, fork names)
    ttt_files: dict = field(default_factory=dict)  # {key: file it was read from}
    lora_scaling: float = 2.0
    notes: dict = field(default_factory=dict)      # provenance details


def read_weights(path) -> dict:
    """Every tensor of a safetensors weights file, on the CPU (CheckpointError naming the file otherwise)."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from None


def _cast(state: dict, dtype) -> dict:
    """moshi's own cast on load: floats to the model dtype, conditioning modules float32."""
    for k, v in state.items():
        if v.dtype.is_floating_point:
            state[k] = v.float() if k.startswith(("condition_provider.", "fuser.")) else v.to(dtype)
    return state


def _load_strict(lm, path, dtype, what: str) -> dict:
    """Loads every LM weight of `path` (strict, TTT tensors split out first); returns the TTT tensors."""
    state, ttt = split_ttt(read_weights(path))
    try:
        lm.load_state_dict(_cast(state, dtype), assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise CheckpointError(f"{what} {path} do not fit the model config.json describes: "
                              f"{lines[1].strip() if len(lines) > 1 else lines[0]}") from None
    return ttt


def _lora_settings(lm_cfg: dict) -> tuple[bool, int, float]:
    return bool(lm_cfg.pop("lora", False)), int(lm_cfg.pop("lora_rank", 128)), float(lm_cfg.pop("lora_scaling", 2.0))


def _base_lm(lm, path, what: str, device, dtype, lora: tuple[bool, int, float]) -> tuple[tp.Any, dict]:
    """(the meta `lm` with every weight of `path` (strict) on `device`, wrapped in moshi's LoRA modules when
    `lora` = (on, rank, scaling) says so, untrained; the TTT tensors split out of `path`)."""
    ttt = _load_strict(lm, path, dtype, what)
    lm = lm.to(device)
    on, rank, scaling = lora
    if on:
        lm = get_lora_moshi(lm, lora_weights=None, lora_rank=rank, lora_scaling=scaling, dtype=dtype,
                            device=device, fuse_lora=False)
    return lm, ttt


def random_lm(res: Resolved, info, device, dtype, force: bool) -> LoadedLM:
    """A real-shape preset's LM (SPEC §8.7): moshi's own init drawn on `device` from a fixed seed, built only
    where the memory estimate fits the device (else refused with the arithmetic).

    Args:
        res, info: the resolved preset and its moshi `CheckpointInfo`.
        device, dtype: where and in which dtype to draw it.
        force: build it even where the estimate does not fit.
    """
    lm_cfg = dict(info.lm_config or {})
    meta = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    section = res.config.get("ttt")
    layers = {}
    if section:
        layers = attach_ttt(meta, FastWeightConfig.from_dict({k: v for k, v in section.items()}))
    need, words = presets.memory_estimate(meta, dtype, layers)
    have = presets.device_memory(device)  # by module: tests stand in a small device here
    if need > have and not force:
        raise ConfigError(f"{res.model_id} does not fit {device}: {words} > {have / 2**30:.1f} GiB of device memory. "
                          f"Use --dtype bf16, a larger device, or moshi-7b-layer on a CPU (--force runs anyway).")
    seed = int(res.config["random_weights"].get("seed", 0))
    devs = [torch.device(device)] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devs):
        torch.manual_seed(seed)
        lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device=device, dtype=dtype)
    lm.eval()
    return LoadedLM(lm)


def load_lm(info, device, dtype) -> LoadedLM:
    """Builds moshi's LM for our layout and moshi's. TTT tensors in the weights files are split out
    before moshi's strict load; without any, moshi's own loader runs unchanged.

    Args:
        info: the checkpoint's moshi `CheckpointInfo` (`resolver.checkpoint_info`).
        device, dtype: the LM's (torch dtype).
    """
    main_keys = safetensors_keys(info.moshi_weights)
    lora_keys = safetensors_keys(info.lora_weights)
    lm_cfg = dict(info.lm_config or {})
    lora, rank, scaling = _lora_settings(lm_cfg)
    if not any(map(ttt_key, main_keys + lora_keys)):
        try:
            return LoadedLM(info.get_moshi(device=device, dtype=dtype), lora_scaling=scaling)
        except RuntimeError as e:
            raise CheckpointError(f"moshi could not load the weights: {str(e).splitlines()[0]}") from None
    lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    lm, ttt = _base_lm(lm, info.moshi_weights, "the weights", device, dtype, (lora, rank, scaling))
    files = {k: str(info.moshi_weights) for k in ttt}
    if lora and info.lora_weights is not None:
        lstate, lttt = split_ttt(read_weights(info.lora_weights))
        ttt.update(lttt)
        files.update({k: str(info.lora_weights) for k in lttt})
        lstate = {k: v.to(device=device, dtype=dtype) if v.dtype.is_floating_point else v.to(device)
                  for k, v in lstate.items()}
        res = lm.load_state_dict(lstate, strict=False)
        if res.unexpected_keys:
            raise CheckpointError(f"unexpected keys in the LoRA weights: {res.unexpected_keys[:5]}")
    lm.eval()
    return LoadedLM(lm, ttt, files, scaling)


def load_fork_lm(info, layout: ForkLayout, ttt_layers: list[int], device, dtype) -> LoadedLM:
    """The LM of a fork checkpoint (SPEC §4.3): every weight from consolidated.safetensors, or the base's
    weights + lora.safetensors (LoRA pairs through moshi's LoRA modules, other tensors loaded over).

    Args:
        info: the checkpoint's moshi `CheckpointInfo` (the base's files where the folder lacks them).
        layout: where the fork checkpoint's folder and weights file are.
        ttt_layers: the layers its `ttt_config` selects (their unused `linear_out` needs no LoRA pair).
        device, dtype: the LM's (torch dtype).
    """
    lm_cfg = dict(info.lm_config or {})
    lora, rank, scaling = _lora_settings(lm_cfg)
    lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    if layout.kind == "consolidated":
        ttt = _load_strict(lm, layout.weights, dtype, "the checkpoint's LM weights")
        lm = lm.to(device).eval()
        return LoadedLM(lm, ttt, {k: str(layout.weights) for k in ttt}, scaling,
                        {"lora": "merged into consolidated.safetensors by the trainer" if lora else False})
    lm, dropped = _base_lm(lm, info.moshi_weights, "the base's LM weights", device, dtype, (lora, rank, scaling))
    rest, ttt = split_ttt(read_weights(layout.weights))
    rest = {k: v.to(device) for k, v in _cast(rest, dtype).items()}
    res = lm.load_state_dict(rest, strict=False)
    if res.unexpected_keys:
        hint = " (LoRA tensors, but config.json says lora: false)" if any(".lora_" in k for k in res.unexpected_keys) else ""
        raise CheckpointError(f"{layout.weights} holds tensors this model does not have{hint}: "
                              f"{', '.join(res.unexpected_keys[:5])}{' ...' if len(res.unexpected_keys) > 5 else ''}.")
    if lora:
        _check_lora_pairs(lm, rest, layout.weights, ttt_layers)
    notes = {"lora": {"rank": rank, "scaling": scaling} if lora else False,
             "loaded_over_base": sorted({".".join(k.split(".")[:3]) for k in rest if ".lora_" not in k})}
    if dropped:
        notes["base_ttt_tensors_ignored"] = len(dropped)
    return LoadedLM(lm.eval(), ttt, {k: str(layout.weights) for k in ttt}, scaling, notes)


def _check_lora_pairs(lm, loaded: dict, file, ttt_layers: list[int]) -> None:
    """`lora: true` must come with trained pairs: moshi's LoRA modules start random (SPEC §4.3)."""
    if not any(".lora_A." in k or ".lora_B." in k for k in loaded):
        raise CheckpointError(f"{file}: config.json says lora: true but the file holds no LoRA tensors "
                              f"(lora_A / lora_B): the fork would run random adapters. Refusing to load it.")
    unused = {checkpoint_key(i, "linear_out") for i in ttt_layers}  # saved, never used by TTT
    missing = [n for n, m in lm.named_modules() if isinstance(m, LoRALinear) and n not in unused
               and not (f"{n}.lora_A.weight" in loaded and f"{n}.lora_B.weight" in loaded)]
    if missing:
        raise CheckpointError(f"{file}: lora: true but {len(missing)} LoRA-wrapped linear(s) have no trained pair "
                              f"(e.g. {', '.join(missing[:3])}): they would run random adapters. Refusing to load it.")


def frozen_linear_out(gating):
    """The down projection's weight without any LoRA delta (a TTT layer's W0 fallback)."""
    m = gating.linear_out
    return m.frozen_W.weight if isinstance(m, LoRALinear) else m.weight
