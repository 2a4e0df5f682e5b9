"""`load_model`: a resolved checkpoint's moshi LM (TTT tensors split out), Mimi and tokenizer, with TTT attached (SPEC §5.0)."""

from __future__ import annotations

import contextlib
import typing as tp
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError, LoadWarning
from ..fastweights.config import TTT_FILE, FastWeightConfig, TTTConfig
from .config import apply_overrides, resolve_ttt_config
from .fork import CLIP_WARNING, ForkLayout, from_fork_config, normalise_ttt_tensors
from .resolver import Resolved, checkpoint_info, resolve, ttt_file, yarn_section
from .tensors import any_ttt_key, check_ttt_tensors, safetensors_keys, split_ttt, ttt_key

TARGET_TENSORS = ("target_generator.conv1d.conv.weight", "target_generator.W_target.weight")


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


@dataclass
class _Loaded:
    """What building the LM produced: the LM, the raw TTT tensors read and where from."""

    lm: tp.Any
    ttt: dict = field(default_factory=dict)        # {key: tensor} as stored (any dtype, fork names)
    ttt_files: dict = field(default_factory=dict)  # {key: file it was read from}
    lora_scaling: float = 2.0
    notes: dict = field(default_factory=dict)      # provenance details


def _read_weights(path) -> dict:
    from safetensors.torch import load_file
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
    state, ttt = split_ttt(_read_weights(path))
    try:
        lm.load_state_dict(_cast(state, dtype), assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise CheckpointError(f"{what} {path} do not fit the model config.json describes: "
                              f"{lines[1].strip() if len(lines) > 1 else lines[0]}") from None
    return ttt


def _lora_settings(lm_cfg: dict) -> tuple[bool, int, float]:
    return bool(lm_cfg.pop("lora", False)), int(lm_cfg.pop("lora_rank", 128)), float(lm_cfg.pop("lora_scaling", 2.0))


def _random_lm(res: Resolved, info, device, dtype, force: bool) -> _Loaded:
    """A real-shape preset's LM (SPEC §8.7): moshi's own init drawn on `device` from a fixed seed, built only
    where the memory estimate fits the device (else refused with the arithmetic)."""
    import torch
    from moshi.models.loaders import get_moshi_lm
    from ..fastweights.config import FastWeightConfig
    from .presets import device_memory, memory_estimate

    lm_cfg = dict(info.lm_config or {})
    meta = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    section = res.config.get("ttt")
    layers = {}
    if section:
        from ..fastweights.attach import attach_ttt
        layers = attach_ttt(meta, FastWeightConfig.from_dict({k: v for k, v in section.items()}))
    need, words = memory_estimate(meta, dtype, layers)
    have = device_memory(device)
    if need > have and not force:
        raise ConfigError(f"{res.model_id} does not fit {device}: {words} > {have / 2**30:.1f} GiB of device memory. "
                          f"Use --dtype bf16, a larger device, or moshi-7b-layer on a CPU (--force runs anyway).")
    seed = int(res.config["random_weights"].get("seed", 0))
    devs = [torch.device(device)] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devs):
        torch.manual_seed(seed)
        lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device=device, dtype=dtype)
    lm.eval()
    return _Loaded(lm)


def _load_lm(info, device, dtype) -> _Loaded:
    """Builds moshi's LM for our layout and moshi's. TTT tensors in the weights files are split out
    before moshi's strict load; without any, moshi's own loader runs unchanged."""
    from moshi.models.loaders import get_lora_moshi, get_moshi_lm

    main_keys = safetensors_keys(info.moshi_weights)
    lora_keys = safetensors_keys(info.lora_weights)
    lm_cfg = dict(info.lm_config or {})
    lora, rank, scaling = _lora_settings(lm_cfg)
    if not any(map(ttt_key, main_keys + lora_keys)):
        try:
            return _Loaded(info.get_moshi(device=device, dtype=dtype), lora_scaling=scaling)
        except RuntimeError as e:
            raise CheckpointError(f"moshi could not load the weights: {str(e).splitlines()[0]}") from None
    lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    ttt = _load_strict(lm, info.moshi_weights, dtype, "the weights")
    files = {k: str(info.moshi_weights) for k in ttt}
    lm = lm.to(device)
    if lora:
        lm = get_lora_moshi(lm, lora_weights=None, lora_rank=rank, lora_scaling=scaling, dtype=dtype,
                            device=device, fuse_lora=False)
        if info.lora_weights is not None:
            lstate, lttt = split_ttt(_read_weights(info.lora_weights))
            ttt.update(lttt)
            files.update({k: str(info.lora_weights) for k in lttt})
            lstate = {k: v.to(device=device, dtype=dtype) if v.dtype.is_floating_point else v.to(device)
                      for k, v in lstate.items()}
            res = lm.load_state_dict(lstate, strict=False)
            if res.unexpected_keys:
                raise CheckpointError(f"unexpected keys in the LoRA weights: {res.unexpected_keys[:5]}")
    lm.eval()
    return _Loaded(lm, ttt, files, scaling)


def _load_fork_lm(info, layout: ForkLayout, ttt_layers: list[int], device, dtype) -> _Loaded:
    """The LM of a fork checkpoint (SPEC §4.3): every weight from consolidated.safetensors, or the base's
    weights + lora.safetensors (LoRA pairs through moshi's LoRA modules, other tensors loaded over)."""
    from moshi.models.loaders import get_lora_moshi, get_moshi_lm

    lm_cfg = dict(info.lm_config or {})
    lora, rank, scaling = _lora_settings(lm_cfg)
    lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    if layout.kind == "consolidated":
        ttt = _load_strict(lm, layout.weights, dtype, "the checkpoint's LM weights")
        lm = lm.to(device).eval()
        return _Loaded(lm, ttt, {k: str(layout.weights) for k in ttt}, scaling,
                       {"lora": "merged into consolidated.safetensors by the trainer" if lora else False})
    dropped = _load_strict(lm, info.moshi_weights, dtype, "the base's LM weights")
    lm = lm.to(device)
    if lora:
        lm = get_lora_moshi(lm, lora_weights=None, lora_rank=rank, lora_scaling=scaling, dtype=dtype,
                            device=device, fuse_lora=False)
    rest, ttt = split_ttt(_read_weights(layout.weights))
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
    return _Loaded(lm.eval(), ttt, {k: str(layout.weights) for k in ttt}, scaling, notes)


def _check_lora_pairs(lm, loaded: dict, file, ttt_layers: list[int]) -> None:
    """`lora: true` must come with trained pairs: moshi's LoRA modules start random (SPEC §4.3)."""
    from moshi.modules.lora import LoRALinear
    if not any(".lora_A." in k or ".lora_B." in k for k in loaded):
        raise CheckpointError(f"{file}: config.json says lora: true but the file holds no LoRA tensors "
                              f"(lora_A / lora_B): the fork would run random adapters. Refusing to load it.")
    unused = {f"transformer.layers.{i}.gating.linear_out" for i in ttt_layers}  # saved, never used by TTT
    missing = [n for n, m in lm.named_modules() if isinstance(m, LoRALinear) and n not in unused
               and not (f"{n}.lora_A.weight" in loaded and f"{n}.lora_B.weight" in loaded)]
    if missing:
        raise CheckpointError(f"{file}: lora: true but {len(missing)} LoRA-wrapped linear(s) have no trained pair "
                              f"(e.g. {', '.join(missing[:3])}): they would run random adapters. Refusing to load it.")


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
    import torch

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    disable_compile_on_cpu(dev)
    res = resolve(source, base=base)
    info = checkpoint_info(res)
    num_layers = int((info.lm_config or {}).get("num_layers", 32))
    overrides = ttt if isinstance(ttt, dict) else None
    notes = _Notes()
    prov = dict(res.provenance)
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
    with torch.no_grad():
        if res.fork is not None:
            fork_layers = mapping.config.layers if mapping.config is not None else []
            loaded = _load_fork_lm(info, res.fork, fork_layers, dev, torch_dtype)
        elif "random_weights" in res.config:
            loaded = _random_lm(res, info, dev, torch_dtype, force)
        else:
            loaded = _load_lm(info, dev, torch_dtype)
        lm = loaded.lm
        prov.update(loaded.notes)
        if cfg is not None and cfg.layers:
            if cfg.variant == "inplace":
                _attach(lm, res, cfg, origin, loaded, target_init, mapping, notes, prov)
            else:
                _attach_variant(lm, res, cfg, origin, target_init, notes, prov)
        yarn = yarn_section(res.config)
        if yarn is not None:
            from .yarn import apply_yarn
            prov["yarn"] = apply_yarn(lm, yarn)
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


def _attach(lm, res: Resolved, cfg: TTTConfig, origin: str, loaded: _Loaded, target_init: str | None,
            mapping, notes: _Notes, prov: dict) -> None:
    """Validates the TTT tensors read, applies the W0 rules, warns once about missing ones, attaches."""
    import torch
    from moshi.modules.lora import LoRALinear
    from ..fastweights.attach import attach_ttt, variant_of

    raw = dict(loaded.ttt)
    files = dict(loaded.ttt_files)
    if origin == "ttt" and _has_ttt_file(res) and _own_variant(res) == "inplace":
        own, path = _read_ttt_file(res, cfg.ttt_name)
        raw.update(own)
        files.update({k: str(path) for k in own})
        prov.setdefault("files", {})["ttt"] = str(path)
    shapes = {i: tuple(_frozen_linear_out(lm.transformer.layers[i].gating).shape)
              for i in cfg.layers if i < len(lm.transformer.layers)}
    fork = res.fork is not None
    by_file: dict[str, dict] = {}
    for k, v in raw.items():
        by_file.setdefault(files[k], {})[k] = v
    for f in sorted(by_file):
        check_ttt_tensors(by_file[f], f, shapes, cfg.conv_kernel_size)
    tensors: dict = {}
    origins: dict = {}
    for f, part in by_file.items():
        t, o = normalise_ttt_tensors(part, mapping.config.layers if fork and mapping.config else None, Path(f),
                                     loaded.lora_scaling)
        tensors.update(t)
        origins.update(o)
    w0: dict[str, str] = {}
    for i in cfg.layers:
        key = f"transformer.layers.{i}.gating.w_down"
        if key in tensors:
            w0[str(i)] = origins[key]
        elif fork:  # the fork's W0: the base linear_out, never with a LoRA delta (SPEC §4.3)
            g = lm.transformer.layers[i].gating
            tensors[key] = _frozen_linear_out(g).detach().to(torch.float32).clone()
            w0[str(i)] = "linear_out" + (" (base weight, LoRA delta not applied)"
                                         if isinstance(g.linear_out, LoRALinear) else "")
        else:
            w0[str(i)] = "linear_out"
    init = target_init or ("zero" if fork else "ntp")
    wanted = [f"transformer.layers.{i}.gating.{n}" for i in cfg.layers for n in TARGET_TENSORS]
    if not (fork and res.fork.kind == "adapters"):  # adapters never hold w_down unless whole layers were saved
        wanted += [f"transformer.layers.{i}.gating.w_down" for i in cfg.layers]
    missing = [k for k in wanted if k not in tensors]
    if missing and origin != "default":
        how = variant_of(cfg).fresh_note(cfg, init)
        _warn_missing(notes, res, missing, how + (" (the fork's own warm start)" if fork and init == "zero" else ""))
    attach_ttt(lm, cfg, tensors, target_init=init)
    prov["ttt_tensors"] = {"w0": w0, "target": {k: origins.get(k, f"initialised ({init})") for k in
                                                  [f"transformer.layers.{i}.gating.{n}" for i in cfg.layers
                                                   for n in TARGET_TENSORS]},
                           "activation": cfg.activation or "the layer's own", "target_source": cfg.target_source,
                           "delta_clip_fro_norm": cfg.delta_clip_fro_norm}


def _attach_variant(lm, res: Resolved, cfg: FastWeightConfig, origin: str, target_init: str | None,
                    notes: _Notes, prov: dict) -> None:
    """TTT-MLP and TTT-Linear (SPEC §3.10, §3.11): their tensors live in the checkpoint's `ttt_name`
    file only; missing ones get the variant's documented fresh init, said once."""
    from ..fastweights.attach import attach_ttt, variant_of

    tensors: dict = {}
    if origin == "ttt" and _has_ttt_file(res) and _own_variant(res) == cfg.variant:
        raw, path = _read_ttt_file(res, cfg.ttt_name, inplace=False)
        tensors = {k: v.float() for k, v in raw.items()}
        prov.setdefault("files", {})["ttt"] = str(path)
    init = target_init or "ntp"
    variant = variant_of(cfg)
    missing = [k for k in variant.tensor_names(cfg) if k not in tensors]
    if missing and origin != "default":
        _warn_missing(notes, res, missing, variant.fresh_note(cfg, init))
    attach_ttt(lm, cfg, tensors, target_init=init)
    prov["ttt_tensors"] = {"variant": cfg.variant, "fresh": len(missing), "from_checkpoint":
                           len(variant.tensor_names(cfg)) - len(missing)}


def _warn_missing(notes: _Notes, res: Resolved, missing: list[str], how: str) -> None:
    """Says once which TTT tensors the checkpoint lacks and how they were made instead."""
    notes.warn(f"checkpoint {res.model_id} lacks TTT tensors {', '.join(missing[:6])}"
               f"{' ...' if len(missing) > 6 else ''}: {how}.")


def _own_variant(res: Resolved) -> str:
    """The variant the checkpoint's own `ttt` section (and so its TTT tensors file) is for. Another variant
    attached by an override (`ttt bench`, `--ttt ...`) gets that variant's documented fresh init instead."""
    return res.config["ttt"].get("variant", "inplace")


def _has_ttt_file(res: Resolved) -> bool:
    """Whether the checkpoint names a TTT tensors file (random-weights presets have none: §3.6 init)."""
    return bool(res.config["ttt"].get("ttt_name", TTT_FILE)) and "random_weights" not in res.config


def _frozen_linear_out(gating):
    """The down projection's weight without any LoRA delta (a TTT layer's W0 fallback)."""
    from moshi.modules.lora import LoRALinear
    m = gating.linear_out
    return m.frozen_W.weight if isinstance(m, LoRALinear) else m.weight


def _read_ttt_file(res: Resolved, name: str, inplace: bool = True) -> tuple[dict, Path]:
    """The checkpoint's own TTT tensors file (`ttt_name`): In-Place keys only, or any variant's."""
    path = ttt_file(res, name)
    raw = _read_weights(path)
    own_key = ttt_key if inplace else any_ttt_key
    bad = [k for k in raw if not own_key(k)]
    if bad:
        raise CheckpointError(f"{path} holds keys that are not TTT tensors: {bad[:5]}")
    return raw, Path(path)
