"""One checkpoint resolver: presets, local directories and hub ids, to moshi's `CheckpointInfo` (SPEC §4.1)."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from moshi.models import loaders

from ..errors import CheckpointError, ConfigError
from .fork import FILE_ROLES, ForkLayout, find_fork_layout, folder_files, is_fork_config
from .presets import PRESETS, ensure_preset
from .yarn import YarnConfig

DEFAULT_MODEL = "kyutai/moshiko-pytorch-bf16"
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
    fork: ForkLayout | None = None   # a checkpoint the fine-tuning fork's trainer wrote (SPEC §4.3)
    base: "Resolved | None" = None   # where a fork checkpoint's missing files come from (`--base`)
    unused_base: str | None = None   # a `--base` given for a fork checkpoint whose folder lacks nothing
    provenance: dict = field(default_factory=dict)  # files used and where from, filled by checkpoint_info


def resolve(source: str | None, base: str | None = None) -> Resolved:
    """Finds a checkpoint: a preset name, a local directory with config.json, a fine-tuning fork
    checkpoint, or a hub id.

    Args:
        source: `tiny`, `tiny-stt`, `bench`, a directory, `org/name[@rev]` or `hf://org/name[@rev]`;
            a fork checkpoint's `consolidated/` folder, its `checkpoint_NNNNNN/` parent or its
            `lora.safetensors` / `consolidated.safetensors` file. None means the default base Moshi.
        base: for fork checkpoints, the base the files its folder lacks come from (any source above but a
            fork checkpoint; default kyutai/moshiko-pytorch-bf16), resolved only when the folder lacks one.
            An error for other sources.
    """
    res = _resolve(source or DEFAULT_MODEL)
    if res.fork is not None:
        lacks = folder_files(res.config, res.fork).missing
        if not lacks:  # a complete folder never touches the hub (SPEC §4.3)
            res.unused_base = base
            return res
        try:
            res.base = _resolve(base or DEFAULT_MODEL)
        except CheckpointError as e:
            raise CheckpointError(f"{res.model_id} is a fine-tuning fork checkpoint whose folder lacks "
                                  f"{'; '.join(lacks)}. What it lacks comes from its base (--base, default "
                                  f"{DEFAULT_MODEL}), which could not be used: {e}") from None
        if res.base.fork is not None:
            raise ConfigError(f"--base {base}: a fine-tuning fork checkpoint cannot be a base; pass the model it was "
                              f"trained from (default {DEFAULT_MODEL}).")
    elif base is not None:
        raise ConfigError(f"--base {base}: --base names the base model of a fine-tuning fork checkpoint "
                          f"(moshi_in_place), and --model {source or DEFAULT_MODEL} is not one. Drop --base.")
    return res


def _resolve(source: str) -> Resolved:
    if source in PRESETS:
        d = ensure_preset(source)
        return Resolved(source, _read_config(d / "config.json"), d)
    p = Path(source).expanduser()
    if p.exists():
        layout = find_fork_layout(p)
        if layout is not None:
            cfg = _read_config(layout.folder / "config.json")
            if is_fork_config(cfg):
                return Resolved(str(layout.weights.resolve() if p.is_file() else layout.folder.resolve()), cfg,
                                layout.folder.resolve(), fork=ForkLayout(layout.folder.resolve(),
                                                                         layout.weights.resolve(), layout.step))
        if not p.is_dir():
            raise CheckpointError(f"--model {source}: expected a checkpoint directory with config.json (or a "
                                  f"fine-tuning fork's lora.safetensors / consolidated.safetensors), got a file.")
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
        # Without a route to the hub, use the local cache only instead of ~20 s of retries.
        cache_only = bool(os.environ.get("HF_HUB_OFFLINE")) or not _hub_reachable()
        try:
            cfg_path = huggingface_hub.hf_hub_download(repo, "config.json", revision=rev, local_files_only=cache_only)
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


def file_ref(res: Resolved, name: str) -> str:
    """A file named in config.json, as moshi's `hf_get` takes it: `hf://`, `file://` and absolute names as they
    are, others inside the checkpoint's directory or hub repo.

    Args:
        res: the resolved checkpoint.
        name: the file name config.json gives.
    """
    if name.startswith(("hf://", "file://")) or os.path.isabs(name):
        return name
    if res.directory is not None:
        return str(res.directory / name)
    return f"hf://{res.hub_repo}/{name}"


def ttt_file(res: Resolved, name: str) -> Path:
    """The checkpoint's own TTT tensors file (`ttt_name` of its `ttt` section): local, or downloaded."""
    if res.directory is not None:
        path = Path(file_ref(res, name))
        if not path.exists():
            raise CheckpointError(f"checkpoint {res.model_id}: the `ttt` section names {name}, which does not exist.")
        return path
    try:
        return Path(loaders.hf_get(file_ref(res, name), revision=res.revision))
    except Exception as e:
        raise CheckpointError(f"could not download {name} of {res.model_id}: {e}") from None


def _local(ref: str) -> Path:
    return Path(str(ref).removeprefix("file://"))


NON_LM_KEYS = ("ttt", "ttt_config", "yarn_config", "random_weights")


def yarn_section(cfg: dict):
    """The checkpoint's enabled `yarn_config` (ours or the fork's) as a `YarnConfig`; None when absent."""
    return YarnConfig.from_dict(cfg.get("yarn_config"), cfg.get("context"))


def moshi_config(cfg: dict) -> dict:
    """The config moshi's loader sees: TTT and YaRN sections removed (moshi passes unknown keys to
    `LMModel`), and `context` multiplied by an active YaRN scale (SPEC §4.3)."""
    out = {k: v for k, v in cfg.items() if k not in NON_LM_KEYS}
    yarn = yarn_section(cfg)
    if yarn is not None and isinstance(out.get("context"), int):
        out["context"] = yarn.context(out["context"])
    return out


def _base_files(base: Resolved) -> dict[str, str | None]:
    """The base's LM weights, Mimi, tokenizer and Mimi config, as refs `hf_get` takes."""
    cfg = base.config  # {} for a legacy hub repo: moshi's default names
    names = {"moshi": cfg.get("moshi_name", loaders.MOSHI_NAME), "mimi": cfg.get("mimi_name", loaders.MIMI_NAME),
             "tokenizer": cfg.get("tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
             "mimi_config": cfg.get("mimi_config_name")}
    return {k: (file_ref(base, v) if v else None) for k, v in names.items()}


def _fork_files(res: Resolved) -> tuple[dict[str, str | None], dict[str, str]]:
    """Files of a fork checkpoint: those its config names and its folder holds, the rest from the base.

    Returns ({role: ref or None}, {role: "checkpoint folder" | "the path config.json names" | "base <id>"}).
    """
    local = folder_files(res.config, res.fork).found
    from_base = _base_files(res.base) if res.base is not None else {}
    files: dict[str, str | None] = {}
    where: dict[str, str] = {}
    for role in FILE_ROLES:
        if role in local:
            files[role], where[role] = str(local[role][0]), local[role][1]
        elif from_base.get(role):
            files[role], where[role] = from_base[role], f"base {res.base.model_id}"
        else:  # a Mimi config nobody names: moshi's default
            files[role] = None
    if res.fork.kind == "consolidated":  # full fine-tuning: every LM weight is in consolidated.safetensors
        files["moshi"], where["moshi"] = str(res.fork.weights), "checkpoint (consolidated.safetensors)"
    return files, where


def checkpoint_info(res: Resolved):
    """moshi's `CheckpointInfo` for a resolved checkpoint, with the TTT and YaRN sections removed.

    Fills `res.provenance` with the files used (and, for fork checkpoints, which came from `--base`).

    Args:
        res: what `resolve` found.
    """
    kw = _fork_kw(res) if res.fork is not None else _own_kw(res)
    info = _moshi_info(res, kw)
    cfg = res.config
    files = {"config": str(res.directory / "config.json") if res.directory is not None
             else f"hf://{res.hub_repo}/config.json",
             "lm_weights": str(info.moshi_weights), "mimi": str(info.mimi_weights), "tokenizer": str(info.tokenizer)}
    if kw.get("mimi_config_path"):
        files["mimi_config"] = str(kw["mimi_config_path"])
    if info.lora_weights is not None:
        files["lora"] = str(info.lora_weights)
    if res.fork is not None and res.fork.kind == "adapters":
        files["adapters"] = str(res.fork.weights)
    if "random_weights" in cfg and res.fork is None:
        files["lm_weights"] = f"random (moshi's init, seed {cfg['random_weights'].get('seed')}; never stored)"
    res.provenance = {**({"format": "ttt" if "ttt" in cfg else "moshi"} if res.fork is None else res.provenance),
                      "files": files}
    return info


def _fork_kw(res: Resolved) -> dict:
    """`CheckpointInfo.from_hf_repo`'s file arguments for a fork checkpoint; sets the fork's part of
    `res.provenance` (its files and which came from the base)."""
    files, where = _fork_files(res)
    kw = dict(moshi_weights=files["moshi"], mimi_weights=files["mimi"], tokenizer=files["tokenizer"])
    if files["mimi_config"]:
        kw["mimi_config_path"] = files["mimi_config"]
    res.provenance = {"format": "moshi_in_place", "kind": res.fork.kind, "step": res.fork.step,
                      "checkpoint": str(res.fork.folder), "weights": str(res.fork.weights),
                      "base": res.base.model_id if res.base is not None else None, "from": where}
    return kw


def _own_kw(res: Resolved) -> dict:
    """`CheckpointInfo.from_hf_repo`'s file arguments for our layout and moshi's (none for a legacy hub repo
    without config.json); a local checkpoint must name files that exist."""
    cfg = res.config
    if res.directory is not None:
        missing = [f"{k}={cfg[k]}" for k in FILE_KEYS if k in cfg and not str(cfg[k]).startswith("hf://")
                   and not _local(file_ref(res, cfg[k])).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {res.model_id} names files that do not exist: {', '.join(missing)}.")
        for k in ("moshi_name", "mimi_name", "tokenizer_name"):
            if k not in cfg and not (k == "moshi_name" and "random_weights" in cfg):
                raise CheckpointError(f"checkpoint {res.model_id}: config.json has no `{k}`; a local checkpoint must "
                                      f"name its weights, Mimi and tokenizer files.")
    if res.directory is None and not res.config:
        return {}
    kw = dict(moshi_weights=file_ref(res, cfg.get("moshi_name", loaders.MOSHI_NAME)),
              mimi_weights=file_ref(res, cfg.get("mimi_name", loaders.MIMI_NAME)),
              tokenizer=file_ref(res, cfg.get("tokenizer_name", loaders.TEXT_TOKENIZER_NAME)))
    if cfg.get("mimi_config_name"):
        kw["mimi_config_path"] = file_ref(res, cfg["mimi_config_name"])
    if cfg.get("lora_name"):
        kw["lora_weights"] = file_ref(res, cfg["lora_name"])
    return kw


def _moshi_info(res: Resolved, kw: dict):
    """moshi's own `CheckpointInfo.from_hf_repo` on the config moshi may see (`moshi_config`) and the files `kw`."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = None
        if res.config:
            base = moshi_config(res.config)
            if res.fork is not None:  # files come from kw; moshi must not look them up itself
                for k in FILE_KEYS:
                    base.pop(k, None)
            cfg_path = Path(tmp) / "config.json"
            cfg_path.write_text(json.dumps(base))
        hub = res.base if res.fork is not None else res  # only a base can be on the hub
        try:
            return loaders.CheckpointInfo.from_hf_repo(hub.hub_repo if hub and hub.hub_repo else "local",
                                                       config_path=cfg_path, revision=hub.revision if hub else None,
                                                       **kw)
        except Exception as e:
            raise CheckpointError(f"could not fetch the files of checkpoint {res.model_id} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Use "
                                  f"`--model tiny` or a local directory when offline.") from None
