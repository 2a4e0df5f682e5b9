"""Shared helpers of the CLI and data-safety tests (SPEC §7.1): CLI runs, file-tree digests, small disks, audio clips.

Disk-full cases run on a real small tmpfs (`mount -t tmpfs -o size=...`, the tests run as root here),
because the point is how the tool meets the operating system's ENOSPC through every writer it uses
(sphn's wav writer, safetensors, matplotlib, plain files). Where mounting is impossible the fixture
falls back to an injected ENOSPC: `ttt_cli.io.atomic_path` (the one writer every output goes
through) given a byte budget, which exercises the same cleanup and reporting paths.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import sphn
from typer.testing import CliRunner

from ttt_cli.cli.app import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HELLO = EXAMPLES / "hello.wav"
SR = 24000


def cli(*args):
    """Runs `ttt ARGS...` in-process; the result has exit_code, stdout (JSON only) and stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (hidden ones included); directories as '<dir>'."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[p.relative_to(root).as_posix() + "/"] = "<dir>"
        for f in filenames:
            p = Path(dirpath) / f
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "?"
    return out


def names(root: Path) -> set[str]:
    """Every file and directory left under `root`, relative (the exact set a test asserts)."""
    return set(tree(root))


def no_temporaries(root: Path) -> bool:
    return not any(".ttt-tmp-" in n or "ttt-write-probe" in n for n in names(root))


def clip(path: Path, start: float = 0.0, seconds: float = 1.0, sr: int = SR) -> Path:
    """A slice of examples/hello.wav (speech, mono) as a 16-bit wav at `sr`."""
    data, _ = sphn.read(str(HELLO), sample_rate=sr)
    x = np.asarray(data, dtype=np.float32).mean(axis=0)[int(start * sr):int((start + seconds) * sr)]
    path.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(path), x, sr)
    return path


def float_wav(path: Path, samples, sr: int = SR) -> None:
    """A 32-bit float WAV written by hand (sphn writes int16, which cannot hold NaN)."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sr, sr * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def lying_wav(path: Path, seconds: float = 1.0, claims: float = 4000.0) -> Path:
    """A wav holding `seconds` of audio whose header claims `claims` seconds (as a cut-off copy would)."""
    clip(path, 0.5, seconds)
    b = bytearray(path.read_bytes())
    assert b[36:40] == b"data", "unexpected wav layout"
    claimed = int(claims * SR) * 2
    b[4:8] = struct.pack("<I", 36 + claimed)
    b[40:44] = struct.pack("<I", claimed)
    path.write_bytes(bytes(b))
    return path


def _mount(target: Path, options: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    return r.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def small_disk(target: Path, size_kb: int, monkeypatch):
    """A directory with room for about `size_kb` KiB: a real tmpfs, else an injected ENOSPC budget.

    Yields "tmpfs" or "injected" (what was used).
    """
    if _mount(target, f"size={size_kb}k"):
        try:
            yield "tmpfs"
        finally:
            _umount(target)
        return
    import ttt_cli.io as tio
    real = tio.atomic_path
    budget = [size_kb * 1024]

    @contextlib.contextmanager
    def limited(path):
        with real(path) as tmp:
            yield tmp
            size = tmp.stat().st_size if tmp.exists() else 0
            if Path(path).resolve().is_relative_to(target.resolve()):
                if size > budget[0]:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                budget[0] -= size
    monkeypatch.setattr(tio, "atomic_path", limited)
    yield "injected"


@contextlib.contextmanager
def read_only_dir(target: Path):
    """A directory nothing can be written into: a read-only tmpfs (root ignores permission bits)."""
    if _mount(target, "ro,size=64k"):
        try:
            yield target
        finally:
            _umount(target)
        return
    if os.geteuid() != 0:
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o555)
        try:
            yield target
        finally:
            target.chmod(0o755)
        return
    import pytest
    pytest.skip("cannot make a read-only directory here (no tmpfs mount, running as root)")
