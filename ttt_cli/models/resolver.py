"""One checkpoint resolver: presets, local directories and hub ids, to moshi's `CheckpointInfo` (SPEC §4.1)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .presets import PRESETS

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


