"""One checkpoint resolver (presets, local directories, hub ids) and `load_model` (SPEC §4, §5.0)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import typing as tp
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .config import TTT_FILE, TTTConfig, from_fork_config, parse_layers
from .errors import CheckpointError, ConfigError
from .io import atomic_write
from .presets import PRESETS

DEFAULT_MODEL = "kyutai/moshiko-pytorch-bf16"
DEFAULT_EVERY = 6
DEFAULT_CHUNK = 512
TTT_KEY = re.compile(r"^(?:.*\.)?transformer\.layers\.(\d+)\.gating\.(w_down|w_down_pretrained|target_generator\..+)$")
# moshi config keys that name files rather than LMModel arguments.
FILE_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name")
HUB_ID = re.compile(r"^(?:hf://)?([\w.-]+/[\w.-]+)(?:@([\w./-]+))?$")


@dataclass
class Resolved:
    """Where a checkpoint's files are, before any weights are read."""

    model_id: str                  # "tiny", "/abs/dir", "org/name@rev"
    config: dict                   # raw config.json
    directory: Path | None         # local directory (presets, local sources)
    hub_repo: str | None = None
    revision: str | None = None


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
    ttt: TTTConfig | None
    warnings: list[str] = field(default_factory=list)

    @property
    def is_stt(self) -> bool:
        return self.lm.dep_q == 0

    @property
    def model_type(self) -> str:
        return self.info.model_type


def resolve(source: str | None) -> Resolved:
    """Finds a checkpoint: a preset name, a local directory with config.json, or a hub id.

    Args:
        source: `tiny`, `tiny-stt`, `bench`, a directory, `org/name[@rev]` or `hf://org/name[@rev]`;
            None means the default base Moshi.
    """
    source = source or DEFAULT_MODEL
    if source in PRESETS:
        from .presets import ensure_preset
        d = ensure_preset(source)
        return Resolved(source, _read_config(d / "config.json"), d)
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"--model {source}: expected a checkpoint directory with config.json, got a file.")
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"--model {source}: the directory has no config.json. A checkpoint directory "
                                  f"holds moshi's config.json and weights (write one with `ttt init-checkpoint`).")
        return Resolved(str(p.resolve()), _read_config(cfg_path), p.resolve())
    m = HUB_ID.match(source)
    if not m or source.startswith((".", "/", "~")):
        raise CheckpointError(f"--model {source}: no such directory, and not a hub id of the form org/name[@revision]. "
                              f"Use `tiny` for the built-in offline model.")
    repo, rev = m.group(1), m.group(2)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        # Without a route to the hub, use the local cache only instead of ~20 s of retries.
        cache_only = bool(os.environ.get("HF_HUB_OFFLINE")) or not _hub_reachable()
        try:
            cfg_path = hf_hub_download(repo, "config.json", revision=rev, local_files_only=cache_only)
            config = _read_config(Path(cfg_path))
        except LocalEntryNotFoundError:
            raise RuntimeError("the hub cannot be reached and the file is not in the local cache") from None
        except EntryNotFoundError:
            config = {}  # legacy Moshi repos have no config.json: moshi assumes Moshi 7B
    except CheckpointError:
        raise
    except Exception as e:  # network, auth, missing repo: one paragraph, no traceback
        raise CheckpointError(
            f"could not download the checkpoint {repo}{'@' + rev if rev else ''} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). Check the network, the "
            f"repo id and your token (HF_TOKEN), or use an offline source: `--model tiny` (built in) or a local "
            f"checkpoint directory.") from None
    return Resolved(f"{repo}@{rev}" if rev else repo, config, None, repo, rev)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        host = re.sub(r"^\w+://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. It must be moshi's config.json (a JSON object).") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return cfg


def _file_ref(res: Resolved, name: str) -> str:
    """A file named in config.json, as moshi's `hf_get` takes it."""
    if name.startswith(("hf://", "file://")) or os.path.isabs(name):
        return name
    if res.directory is not None:
        return str(res.directory / name)
    return f"hf://{res.hub_repo}/{name}"


def checkpoint_info(res: Resolved):
    """moshi's `CheckpointInfo` for a resolved checkpoint, with the TTT sections removed."""
    from moshi.models import loaders

    cfg = res.config
    if res.directory is not None:
        missing = [f"{k}={cfg[k]}" for k in FILE_KEYS if k in cfg and not str(cfg[k]).startswith("hf://")
                   and not Path(_file_ref(res, cfg[k])).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {res.model_id} names files that do not exist: {', '.join(missing)}.")
        for k in ("moshi_name", "mimi_name", "tokenizer_name"):
            if k not in cfg:
                raise CheckpointError(f"checkpoint {res.model_id}: config.json has no `{k}`; a local checkpoint must "
                                      f"name its weights, Mimi and tokenizer files.")
    kw = {}
    if res.directory is not None or res.config:
        kw = dict(moshi_weights=_file_ref(res, cfg.get("moshi_name", loaders.MOSHI_NAME)),
                  mimi_weights=_file_ref(res, cfg.get("mimi_name", loaders.MIMI_NAME)),
                  tokenizer=_file_ref(res, cfg.get("tokenizer_name", loaders.TEXT_TOKENIZER_NAME)))
        if cfg.get("mimi_config_name"):
            kw["mimi_config_path"] = _file_ref(res, cfg["mimi_config_name"])
        if cfg.get("lora_name"):
            kw["lora_weights"] = _file_ref(res, cfg["lora_name"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = None
        if res.config:
            base = {k: v for k, v in cfg.items() if k not in ("ttt", "ttt_config")}
            cfg_path = Path(tmp) / "config.json"
            cfg_path.write_text(json.dumps(base))
        try:
            info = loaders.CheckpointInfo.from_hf_repo(res.hub_repo or "local", config_path=cfg_path,
                                                       revision=res.revision, **kw)
        except Exception as e:
            raise CheckpointError(f"could not fetch the files of checkpoint {res.model_id} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use "
                                  f"`--model tiny` or a local directory when offline.") from None
    return info


def _safetensors_keys(path) -> list[str]:
    from safetensors import safe_open
    if path is None or not str(path).endswith((".safetensors", ".sft", ".sfts")):
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from None


def _split_ttt(state: dict) -> tuple[dict, dict]:
    ttt = {k: state.pop(k) for k in [k for k in state if _ttt_key(k)]}
    return state, ttt


def _ttt_key(k: str) -> bool:
    return bool(TTT_KEY.match(k))


def _normalise_ttt_tensors(raw: dict, lora_scaling: float) -> dict:
    """Fork tensors -> our names: fuse LoRA-wrapped W_target (W + scaling·B·A), drop w_down_pretrained."""
    out = {}
    for k, v in raw.items():
        m = TTT_KEY.match(k)
        i, name = m.group(1), m.group(2)
        base = f"transformer.layers.{i}.gating."
        if name == "w_down_pretrained":
            continue
        if name.startswith("target_generator.W_target.") and name != "target_generator.W_target.weight":
            if name.endswith("frozen_W.weight"):
                pre = k[: -len("frozen_W.weight")]
                a, b = raw.get(pre + "lora_A.weight"), raw.get(pre + "lora_B.weight")
                w = v.float()
                if a is not None and b is not None:
                    w = w + lora_scaling * (b.float() @ a.float())
                out[base + "target_generator.W_target.weight"] = w
            continue
        out[base + name] = v.float()
    return out


def _load_lm(info, device, dtype):
    """Builds moshi's LM. TTT tensors in the weights files are split out before moshi's strict load."""
    from safetensors.torch import load_file
    from moshi.models.loaders import get_lora_moshi, get_moshi_lm

    main_keys = _safetensors_keys(info.moshi_weights)
    lora_keys = _safetensors_keys(info.lora_weights)
    lm_cfg = dict(info.lm_config or {})
    scaling = float(lm_cfg.get("lora_scaling", 2.0))
    if not any(map(_ttt_key, main_keys + lora_keys)):
        try:
            return info.get_moshi(device=device, dtype=dtype), {}
        except RuntimeError as e:
            raise CheckpointError(f"moshi could not load the weights: {str(e).splitlines()[0]}") from None
    lora = lm_cfg.pop("lora", False)
    rank = lm_cfg.pop("lora_rank", 128)
    lm_cfg.pop("lora_scaling", None)
    lm = get_moshi_lm(None, lm_kwargs=lm_cfg, device="meta", dtype=dtype)
    state, ttt = _split_ttt(load_file(str(info.moshi_weights), device="cpu"))
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
            lstate, lttt = _split_ttt(load_file(str(info.lora_weights), device="cpu"))
            ttt.update(lttt)
            lstate = {k: v.to(device=device, dtype=dtype) if v.dtype.is_floating_point else v.to(device)
                      for k, v in lstate.items()}
            res = lm.load_state_dict(lstate, strict=False)
            if res.unexpected_keys:
                raise CheckpointError(f"unexpected keys in the LoRA weights: {res.unexpected_keys[:5]}")
    lm.eval()
    return lm, _normalise_ttt_tensors(ttt, scaling)


def default_ttt_section(num_layers: int) -> dict:
    """§4.1 default for base checkpoints: every 6th layer from 0, chunk 512, ntp target."""
    return {"layers": list(range(0, num_layers, DEFAULT_EVERY)), "chunk_size": DEFAULT_CHUNK}


def resolve_ttt_config(config: dict, num_layers: int, overrides: dict | None = None) -> tuple[TTTConfig | None, str]:
    """The TTT config of a checkpoint: its `ttt` section, the fork's `ttt_config`, or the default.

    Returns (config or None when the fork disables TTT, where it came from).
    """
    if "ttt" in config:
        cfg, origin = TTTConfig.from_dict(config["ttt"], num_layers), "ttt"
    elif "ttt_config" in config:
        cfg, origin = from_fork_config(config["ttt_config"], num_layers), "fork"
    else:
        cfg, origin = TTTConfig.from_dict(default_ttt_section(num_layers), num_layers), "default"
    if overrides:
        unknown = sorted(set(overrides) - set(TTTConfig.valid_keys()))
        if unknown:
            raise ConfigError(f"unknown TTT override(s): {', '.join(unknown)}. Valid keys: "
                              f"{', '.join(TTTConfig.valid_keys())}.")
        overrides = dict(overrides)
        if isinstance(overrides.get("layers"), str):
            overrides["layers"] = parse_layers(overrides["layers"], num_layers)
        cfg = (cfg or TTTConfig(layers=[])).with_overrides(overrides, num_layers)
    return cfg, origin


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
    from .attach import attach_ttt

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
            wanted = [f"transformer.layers.{i}.gating.{n}" for i in cfg.layers
                      for n in ("w_down", "target_generator.conv1d.conv.weight", "target_generator.W_target.weight")]
            missing = [k for k in wanted if k not in tensors]
            if missing and origin != "default":
                msg = (f"checkpoint {res.model_id} lacks TTT tensors {', '.join(missing[:6])}"
                       f"{' ...' if len(missing) > 6 else ''}: initialised by SPEC §3.6 (w_down <- linear_out, "
                       f"target {init}).")
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
    bad = [k for k in raw if not _ttt_key(k)]
    if bad:
        raise CheckpointError(f"{path} holds keys that are not TTT tensors: {bad[:5]}")
    return {k: v.float() for k, v in raw.items()}


# -- writing -------------------------------------------------------------------------------------

def ttt_tensors_for(lm, cfg: TTTConfig, target_init: str) -> dict:
    """TTT tensors for every layer of `cfg` by SPEC §3.6, from an LM's `linear_out` weights."""
    import torch
    from .inplace import TargetGenerator, linear_weight
    out = {}
    for i in cfg.layers:
        g = lm.transformer.layers[i].gating
        w = linear_weight(g.linear_out).detach().to("cpu", torch.float32).contiguous()
        tg = TargetGenerator(w.shape[0], cfg.conv_kernel_size, cfg.conv_padding)
        tg.init_zero() if target_init == "zero" else tg.init_ntp()
        pre = f"transformer.layers.{i}.gating."
        out[pre + "w_down"] = w.clone()
        out[pre + "target_generator.conv1d.conv.weight"] = tg.conv1d.conv.weight.detach().contiguous()
        out[pre + "target_generator.W_target.weight"] = tg.W_target.weight.detach().contiguous()
    return out


def add_ttt_to_checkpoint(directory: Path, section: dict, target_init: str = "ntp", lm=None) -> TTTConfig:
    """Adds a `ttt` section and ttt.safetensors to a moshi checkpoint directory (in place)."""
    import torch
    from safetensors.torch import save_file

    cfg_path = directory / "config.json"
    config = _read_config(cfg_path)
    num_layers = int(config.get("num_layers", 32))
    cfg = TTTConfig.from_dict({k: v for k, v in section.items()}, num_layers)
    if lm is None:
        lm = checkpoint_info(Resolved(str(directory), config, directory)).get_moshi(device="cpu", dtype=torch.float32)
    tensors = ttt_tensors_for(lm, cfg, target_init)
    atomic_write(directory / cfg.ttt_name, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config.pop("ttt_config", None)
    config["ttt"] = cfg.to_dict()
    atomic_write(cfg_path, lambda p: p.write_text(json.dumps(config, indent=2)))
    return cfg


@dataclass
class InitResult:
    out: Path
    model_id: str
    ttt: dict
    files: list[str]
    target_init: str


def init_checkpoint(source: str | None, out: Path, layers: list[int] | str | None = None, target_init: str = "ntp",
                    section: dict | None = None, copy_base: bool = False, overwrite: bool = False) -> InitResult:
    """Writes a loadable TTT checkpoint directory from a base checkpoint or preset, then loads it back.

    Args:
        source: base checkpoint (preset, directory, hub id).
        out: directory to write.
        layers: TTT layers, as a list or `--ttt-layers` syntax (default: every 6th from 0, or the preset's).
        target_init: `ntp` or `zero` (SPEC §3.6).
        section: further `ttt` keys (chunk_size, lr, ...).
        copy_base: copy the base weights into `out` instead of referencing them.
        overwrite: replace an existing non-empty `out`.
    """
    import torch
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it.")
    res = resolve(source)
    info = checkpoint_info(res)
    num_layers = int((info.lm_config or {}).get("num_layers", 32))
    base_cfg, _ = resolve_ttt_config(res.config, num_layers)
    sec = (base_cfg.to_dict() if base_cfg else default_ttt_section(num_layers))
    sec.update(section or {})
    if layers is not None:
        sec["layers"] = parse_layers(layers, num_layers) if isinstance(layers, str) else layers
    sec["ttt_name"] = TTT_FILE
    TTTConfig.from_dict(sec, num_layers)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        config = {k: v for k, v in res.config.items() if k not in ("ttt", "ttt_config")}
        if not config:  # legacy hub repo without config.json: moshi's default file names
            from moshi.models import loaders
            config = {"moshi_name": loaders.MOSHI_NAME, "mimi_name": loaders.MIMI_NAME,
                      "tokenizer_name": loaders.TEXT_TOKENIZER_NAME}
        for key in [k for k in FILE_KEYS if config.get(k)]:
            name = config[key]
            ref = _file_ref(res, name)
            if copy_base or res.directory is not None and res.model_id in PRESETS:
                from moshi.models.loaders import hf_get
                src = hf_get(ref) if ref.startswith("hf://") else Path(ref)
                shutil.copy(src, tmp / Path(name).name)
                config[key] = Path(name).name
            else:
                config[key] = ref
        if info.lm_config is not None:
            for k, v in info.lm_config.items():
                config.setdefault(k, v)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        lm, _ = _load_lm(checkpoint_info(Resolved(str(tmp), config, tmp)), "cpu", torch.float32)
        cfg = add_ttt_to_checkpoint(tmp, sec, target_init, lm=lm)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    m = load_model(str(out), device="cpu", dtype="fp32")  # verify it loads before reporting success
    if m.ttt is None or m.ttt.layers != cfg.layers:
        raise CheckpointError(f"{out} was written but does not load back with TTT layers {cfg.layers}.")
    return InitResult(out, res.model_id, cfg.to_dict(), sorted(p.name for p in out.iterdir()), target_init)
