"""How evals find and name their inputs: natural order, skipped files, header durations, relative paths, digests."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import sphn
import torch

from ttt_cli.outputs import input_problem

HASH_BLOCK = 1 << 20  # bytes read at a time when hashing audio files


def natural_key(text: str) -> tuple:
    """Sort key where digit runs compare as numbers: `2.flac` < `10.flac`, `speaker9` < `speaker10`.

    Args:
        text: a file or folder name.
    """
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in parts if p != "")


@dataclass
class SkippedFile:
    """An input file left out, and why; `failed` is False when an option excluded it (a cut, a limit)."""

    path: str
    reason: str
    failed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def probe_seconds(path: Path) -> float:
    """Duration from the file header; raises ValueError with a reason when the file cannot be opened.

    Args:
        path: an audio file.
    """
    problem = input_problem(path)
    if problem is not None:
        raise ValueError(problem)
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        seconds = float(sphn.FileReader(str(path)).duration_sec)
    except Exception as e:
        detail = (str(e).replace(f'"{path}": ', "").replace(f"{path}: ", "").strip() or type(e).__name__)
        raise ValueError(f"cannot decode as audio ({detail})") from None
    if not seconds > 0:
        raise ValueError("no audio (0 s)")
    return seconds


def rel_path(path: str | Path, root: Path) -> str:
    """A path relative to the dataset root (portable across machines), else as given.

    Args:
        path: an input's path.
        root: the dataset's root directory.
    """
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def digest_or_none(path: Path | str) -> str | None:
    """`file_digest`, or None for a file that cannot be read (gone, unreadable).

    Args:
        path: the file.
    """
    try:
        return file_digest(path)
    except OSError:
        return None


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes.

    Args:
        path: the file.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(HASH_BLOCK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def mimi_fingerprint(mimi) -> str:
    """sha256 over Mimi's weights (names, shapes, dtypes, bytes) and codebook count: the codes cache's model
    key, and the model section's `mimi_fingerprint`.

    Args:
        mimi: moshi MimiModel.
    """
    h = hashlib.sha256()
    h.update(f"n_q={mimi.num_codebooks}".encode())
    for name, t in sorted(mimi.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()
