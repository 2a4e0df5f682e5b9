"""Snapshot files: safetensors with the metadata JSON under `ttt_state`, written atomically, read and validated."""

from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

import safetensors.torch  # `safetensors.torch.save_file` looked up per call: tests stand in a failing disk there
import torch
from safetensors import safe_open

from .. import __version__
from ..errors import ConfigError, StateMismatchError
from ..fastweights.config import config_class
from ..fastweights.attach import layer_class
from ..io import atomic_write, shown
from ..outputs import input_problem
from .format import ATTN_PREFIX, FORMAT, FORMAT_VERSION, INVALID_HINT, LATER_KEYS, LAYER_KEY, META_KEY, \
    FastWeightState, config_keys

Bad = tp.Callable[[str], tp.NoReturn]  # raises the file's StateMismatchError with the message given


def _jsonable(meta: dict) -> str:
    try:
        return shown(json.dumps(meta, sort_keys=True, allow_nan=False, default=str))
    except ValueError as e:
        raise ConfigError(f"snapshot metadata is not valid JSON: {e}") from None


def save_state(s: FastWeightState, path: str | Path, metadata: dict | None = None, overwrite: bool = False,
               verify: bool = True) -> Path:
    """Writes a snapshot as safetensors (metadata JSON under the header key `ttt_state`), atomically.

    Args:
        s: the snapshot.
        path: file to write.
        metadata: keys added to (or replacing) `s.meta`: e.g. steps, seconds, source_files, reset_policy.
        overwrite: replace an existing file.
        verify: load the written (temporary) file back and check every tensor and the metadata before
            it replaces `path`; a mismatch raises StateMismatchError and leaves no file.
    Returns:
        The path written.
    Raises:
        ConfigError: `path` exists (without `overwrite`) or is a directory.
        OSError: the write failed (nothing is left at `path`'s temporary name; an existing `path` is unchanged).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"refusing to overwrite {path}; pass --overwrite to replace.")
    if path.exists() and path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name for the snapshot.")
    meta = {**s.meta, **(metadata or {})}
    header = {META_KEY: _jsonable(meta), "format": "pt"}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in s.tensors.items()}

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
        if verify:  # the temporary file is checked before it replaces anything: a bad write leaves nothing
            _verify(path, tmp, tensors, json.loads(header[META_KEY]))

    atomic_write(path, write)  # OSError on a full disk etc.: the commands report it as a write failure
    s.meta = json.loads(header[META_KEY])
    return path


def _verify(path: Path, tmp: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The written temporary file `tmp` reads back as `tensors` and `meta` (else StateMismatchError on `path`)."""
    try:
        back = load_state(tmp)
    except StateMismatchError as e:
        raise StateMismatchError(f"{path} was written but does not read back ({e}); the disk may be "
                                 f"full or failing.") from None
    bad = [k for k in tensors if k not in back.tensors or not torch.equal(back.tensors[k], tensors[k])]
    if bad or set(back.tensors) != set(tensors) or back.meta != meta:
        raise StateMismatchError(f"{path} was written but does not read back identically "
                                 f"({', '.join(bad[:3]) or 'metadata'}); the disk may be full or failing.")


def load_state(path: str | Path) -> FastWeightState:
    """Reads and validates a snapshot file.

    Args:
        path: a `.safetensors` file written by `save_state` / `ttt export-state`.
    Raises:
        ConfigError: missing path.
        StateMismatchError: unreadable, truncated or foreign file, or invalid contents (says which).
    """
    path = Path(path)
    problem = input_problem(path)
    if problem == "no such file":
        raise ConfigError(f"{path}: no such snapshot file.", hint="give the path of a snapshot (ttt export-state)")
    if problem is not None:
        raise ConfigError(f"{path}: {problem.replace('an audio file', 'a snapshot file')}.",
                          hint="give the path of a snapshot (ttt export-state)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateMismatchError(f"{path}: cannot read as safetensors ({detail}); the file is corrupted or "
                                 f"truncated, or not a safetensors file.", hint=INVALID_HINT) from None
    if META_KEY not in header:
        raise StateMismatchError(f"{path}: a safetensors file without `{META_KEY}` metadata: not a fast-weight "
                                 f"snapshot (write one with `ttt export-state`).", hint=INVALID_HINT)
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise StateMismatchError(f"{path}: its `{META_KEY}` metadata is not valid JSON ({e}).",
                                 hint=INVALID_HINT) from None
    _validate(path, meta, tensors)
    return FastWeightState(tensors, meta)


def _validate(path: Path, meta: tp.Any, tensors: dict[str, torch.Tensor]) -> None:
    """Refuses (StateMismatchError naming the file and the reason) metadata or tensors a snapshot cannot hold."""
    def bad(msg: str) -> tp.NoReturn:
        raise StateMismatchError(f"{path}: invalid fast-weight snapshot: {msg}", hint=INVALID_HINT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        bad(f"its metadata does not say format {FORMAT!r}.")
    ver = meta.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        bad(f"format version {ver!r}; this ttt ({__version__}) reads versions up to {FORMAT_VERSION}.")
    try:
        variant_keys = config_keys(meta.get("variant"))
    except ConfigError as e:
        bad(str(e).removeprefix("invalid `ttt` config: "))
    missing = [k for k in variant_keys + ["model_fingerprint", "w0_fingerprint"]
               if k not in meta and k not in LATER_KEYS]
    if missing:
        bad(f"metadata lacks {', '.join(missing)}.")
    layers = meta["layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        bad(f"layers must be a list of integers >= 0, got {layers!r}.")
    try:  # the TTT config keys: the variant's own validation, as for a checkpoint's `ttt` section
        config_class(meta["variant"]).from_dict({k: meta[k] for k in variant_keys if k in meta})
    except ConfigError as e:
        bad(f"metadata: {str(e).removeprefix('invalid `ttt` config: ')}")
    _validate_meta_values(meta, bad)
    _validate_tensors(meta, tensors, bad)
    for i in layers:  # each variant's layer checks its own tensors (In-Place: the pending chunk)
        problem = layer_class(meta["variant"]).check_stored(
            {k.removeprefix(f"layers.{i}."): t for k, t in tensors.items() if k.startswith(f"layers.{i}.")},
            meta["chunk_size"], (meta.get("pending_tokens") or {}).get(str(i)))
        if problem:
            bad(f"layer {i}: {problem}")
    if meta.get("attention"):
        _validate_attention(meta, tensors, bad)


def _validate_tensors(meta: dict, tensors: dict[str, torch.Tensor], bad: Bad) -> None:
    """Every tensor is a listed layer's (float32, finite) or an attention tensor; every layer has some."""
    layers = meta["layers"]
    seen: set[int] = set()
    for k, t in tensors.items():
        if k.startswith(ATTN_PREFIX):
            if not meta.get("attention"):
                bad(f"tensor {k} but the metadata says no attention state.")
            continue
        m = LAYER_KEY.match(k)
        if not m:
            bad(f"unexpected tensor {k} (expected layers.<i>.<name> or attention.<module>.<field>).")
        i = int(m.group(1))
        if i not in layers:
            bad(f"tensor {k} is for layer {i}, which the metadata does not list ({layers}).")
        if t.dtype != torch.float32:
            bad(f"tensor {k} is {t.dtype}, fast-weight tensors are float32.")
        if not torch.isfinite(t).all():
            bad(f"tensor {k} holds NaN or infinite values.")
        seen.add(i)
    if set(layers) - seen:
        bad(f"no tensors for layer(s) {sorted(set(layers) - seen)}.")


def _validate_attention(meta: dict, tensors: dict[str, torch.Tensor], bad: Bad) -> None:
    """The `attention_state` metadata is there and every tensor it names is in the file."""
    spec = meta.get("attention_state")
    if not isinstance(spec, dict):
        bad("attention=true but no attention_state metadata.")
    for name, entry in spec.items():
        for fname, fs in entry.get("fields", {}).items():
            key = f"{ATTN_PREFIX}{name}.{fname}"
            need = [key + ".keys", key + ".values"] if fs.get("kind") == "ring" else (
                [key] if fs.get("kind") in ("batch", "shared") else [])
            lost = [n for n in need if n not in tensors]
            if lost:
                bad(f"attention tensors {lost} are missing.")


def _is_num(v: tp.Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_meta_values(meta: dict, bad: Bad) -> None:
    """Types and ranges of the metadata values that commands read (a hand-edited header is refused, named)."""
    def check(key: str, ok: tp.Callable[[tp.Any], bool], want: str, optional: bool = True) -> None:
        if key in meta and not (optional and meta[key] is None) and not ok(meta[key]):
            bad(f"metadata `{key}` must be {want}, got {meta[key]!r}.")
    for k in ("model_fingerprint", "w0_fingerprint"):
        check(k, lambda v: isinstance(v, str) and v != "", "a hex digest", optional=False)
    check("steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
    check("seconds", lambda v: _is_num(v) and v >= 0, "a finite number >= 0")
    check("source_files", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of paths")
    check("pending_tokens", lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 and x >= 0 for x in v.values()),
          "an object of integers >= 0")
    check("telemetry", lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
          "an object per layer")
    check("w0_norms", lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()),
          "an object of finite numbers")
    check("flushed", lambda v: isinstance(v, bool), "true or false")
    check("attention", lambda v: isinstance(v, bool), "true or false")
    for k in ("model", "created", "reset_policy", "tool_version", "label"):
        check(k, lambda v: isinstance(v, str), "a string")
    numeric = ("tokens", "updates", "resets", "clip_events", "nonfinite_events", "pending_tokens", "relative_drift")
    for i, t in (meta.get("telemetry") or {}).items():
        for k in numeric:
            if k in t and not _is_num(t[k]):
                bad(f"metadata `telemetry.{i}.{k}` must be a finite number, got {t[k]!r}.")
