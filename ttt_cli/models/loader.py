"""`load_model`: a resolved checkpoint's moshi LM (TTT tensors split out), Mimi and tokenizer, with TTT attached (SPEC §5.0)."""

from __future__ import annotations

import contextlib
import typing as tp
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..fastweights.config import TTT_FILE, FastWeightConfig
from .config import resolve_ttt_config
from .fork import normalise_ttt_tensors
from .resolver import Resolved, _file_ref, checkpoint_info, resolve
from .tensors import any_ttt_key, safetensors_keys, split_ttt, ttt_key


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

    @property
    def is_stt(self) -> bool:
        return self.lm.dep_q == 0

    @property
    def model_type(self) -> str:
        return self.info.model_type


def _load_lm(info, device, dtype):
    """Builds moshi's LM. TTT tensors in the weights files are split out before moshi's strict load."""
    from safetensors.torch import load_file
    from moshi.models.loaders import get_lora_moshi, get_moshi_lm

    main_keys = safetensors_keys(info.moshi_weights)
    lora_keys = safetensors_keys(info.lora_weights)
    lm_cfg = dict(info.lm_config or {})
    scaling = float(lm_cfg.get("lora_scaling", 2.0))
    if not any(map(ttt_key, main_keys + lora_keys)):
        try:
            return info.get_moshi(device=device, dtype=dtype), {}
        except RuntimeError as e:
            raise CheckpointError(f"moshi could not load the weights: {str(e).splitlines()[0]}") from None
    lora = lm_cfg.pop("lora", False)
    rank = lm_cfg.pop("lora_rank", 128)
    lm_cfg.pop("lora_scaling", None)
    lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    state, ttt = split_ttt(load_file(str(info.moshi_weights), device="cpu"))
    for k, v in state.items():
        if v.dtype.is_floating_point:
            state[k] = v.float() if k.startswith(("condition_provider.", "fuser.")) else v.to(dtype)
    try:
        lm.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights file {info.moshi_weights} does not fit the config: "
                              f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from None
    lm = lm.to(device)
    if lora:
        lm = get_lora_moshi(lm, lora_weights=None, lora_rank=rank, lora_scaling=scaling, dtype=dtype,
                            device=device, fuse_lora=False)
        if info.lora_weights is not None:
            lstate, lttt = split_ttt(load_file(str(info.lora_weights), device="cpu"))
            ttt.update(lttt)
            lstate = {k: v.to(device=device, dtype=dtype) if v.dtype.is_floating_point else v.to(device)
                      for k, v in lstate.items()}
            res = lm.load_state_dict(lstate, strict=False)
            if res.unexpected_keys:
                raise CheckpointError(f"unexpected keys in the LoRA weights: {res.unexpected_keys[:5]}")
    lm.eval()
    return lm, normalise_ttt_tensors(ttt, scaling)


def resolve_device(device: str | None) -> str:
    import torch
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device}: expected auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here. Use --device cpu.")
    return device


def resolve_dtype(dtype: str | None, device: str):
    import torch
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
        from moshi.utils.compile import no_compile
        _COMPILE_OFF.enter_context(no_compile())


def load_model(source: str | None = "tiny", device: str | None = "auto", dtype: str | None = "auto",
               ttt: dict | bool | None = None, target_init: str | None = None) -> TTTModel:
    """Loads a checkpoint with TTT attached.

    Args:
        source: preset name, local directory or hub id (SPEC §4.1).
        device: auto, cpu or cuda.
        dtype: auto, bf16, fp16 or fp32 (fast weights stay float32 whatever this is).
        ttt: overrides of the `ttt` section (e.g. {"lr": 0}), or False for plain moshi (no TTT layers).
        target_init: `ntp` or `zero`, for target generators the checkpoint does not provide
            (default: `zero` for fork checkpoints, `ntp` otherwise).
    """
    import torch
    from ..fastweights.attach import attach_ttt, variant_of

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    disable_compile_on_cpu(dev)
    res = resolve(source)
    info = checkpoint_info(res)
    num_layers = int((info.lm_config or {}).get("num_layers", 32))
    cfg, origin = (None, "off") if ttt is False else resolve_ttt_config(
        res.config, num_layers, ttt if isinstance(ttt, dict) else None)
    notes: list[str] = []
    with torch.no_grad():
        lm, tensors = _load_lm(info, dev, torch_dtype)
        if cfg is not None and cfg.layers:
            if origin == "ttt" and res.config["ttt"].get("ttt_name", TTT_FILE):
                tensors = {**tensors, **_read_ttt_file(res, cfg.ttt_name)}
            init = target_init or ("zero" if origin == "fork" else "ntp")
            variant = variant_of(cfg)
            missing = [k for k in variant.tensor_names(cfg) if k not in tensors]
            if missing and origin != "default":
                msg = (f"checkpoint {res.model_id} lacks TTT tensors {', '.join(missing[:6])}"
                       f"{' ...' if len(missing) > 6 else ''}: {variant.fresh_note(cfg, init)}.")
                warnings.warn(msg)
                notes.append(msg)
            attach_ttt(lm, cfg, tensors, target_init=init)
    mimi = info.get_mimi(device=dev)
    tokenizer = info.get_text_tokenizer()
    config = dict(res.config)
    config.pop("ttt_config", None)
    config["ttt"] = cfg.to_dict() if cfg is not None else None
    config["ttt_origin"] = origin
    return TTTModel(lm, mimi, tokenizer, config, res.model_id, info, dev, torch_dtype, cfg, notes)


def _read_ttt_file(res: Resolved, name: str) -> dict:
    from safetensors.torch import load_file
    if res.directory is not None:
        path = Path(_file_ref(res, name))
        if not path.exists():
            raise CheckpointError(f"checkpoint {res.model_id}: the `ttt` section names {name}, which does not exist.")
    else:
        from moshi.models.loaders import hf_get
        try:
            path = hf_get(_file_ref(res, name), revision=res.revision)
        except Exception as e:
            raise CheckpointError(f"could not download {name} of {res.model_id}: {e}") from None
    try:
        raw = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read TTT tensors {path}: {e}") from None
    bad = [k for k in raw if not any_ttt_key(k)]
    if bad:
        raise CheckpointError(f"{path} holds keys that are not TTT tensors: {bad[:5]}")
    return {k: v.float() for k, v in raw.items()}
