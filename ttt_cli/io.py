"""Atomic output writing: a temporary name in the same directory, then a rename (SPEC §7)."""

from __future__ import annotations

import json
import os
import typing as tp
from pathlib import Path

from .errors import ConfigError


def atomic_write(path: Path | str, write: tp.Callable[[Path], None]) -> Path:
    """Calls `write(tmp_path)` then renames onto `path`; nothing half-written is ever left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: Path | str, obj: tp.Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_writable_dir(path: Path | str) -> Path:
    """Creates `path` if needed and checks that files can be written there."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ttt-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to the output directory {path}: {e.strerror or e}. "
                          f"Choose another --out.") from None
    return path


def refuse_overwrite(paths: tp.Iterable[Path], overwrite: bool) -> None:
    """Raises if any of `paths` exists and `overwrite` is False."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 3} more)" if len(existing) > 3 else ""
        raise ConfigError(f"refusing to overwrite {', '.join(existing[:3])}{more}; pass --overwrite to replace.")
