"""Shared helpers of the CLI and data-safety tests (SPEC §7.1): CLI runs, file-tree digests, small disks, audio clips.

Disk-full cases run on a real small tmpfs (`mount -t tmpfs -o size=...`, when the tests run as root),
because the point is how the tool meets the operating system's ENOSPC through every writer it uses
(sphn's wav writer, safetensors, matplotlib, plain files). Where mounting is impossible the fixture
falls back to an injected ENOSPC: `ttt_cli.io.atomic_path` (the one writer every output goes
through) given a byte budget, which exercises the same cleanup and reporting paths.

Read-only cases use a directory without write permission. Root ignores permission bits, so as root the
command runs in a child process whose capability bounding set lacks CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (util-linux `setpriv`): the child meets EACCES exactly as a user would.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import typing as tp
from dataclasses import dataclass
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


# Root keeps every capability but these two in the child: permission bits then apply to it.
_DROP = "-dac_override,-dac_read_search"
SETPRIV = ["setpriv", "--bounding-set", _DROP, "--inh-caps", _DROP, "--"]


@functools.cache
def _setpriv_problem() -> str | None:
    """Why a child cannot be made to obey permission bits here (None: it can), checked on a real directory."""
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o555)
        try:
            r = subprocess.run([*SETPRIV, "touch", os.path.join(d, "x")], capture_output=True, text=True)
        finally:
            os.chmod(d, 0o755)
    if r.returncode == 0:
        return "setpriv ran, but the child could still write into a read-only directory"
    if "Permission denied" not in r.stderr:
        return f"setpriv cannot drop CAP_DAC_OVERRIDE here: {r.stderr.strip()[-200:]}"
    return None


@dataclass
class ChildResult:
    """`cli`'s result (exit_code, stdout, stderr, output) for a command run in a child process."""
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _child_cli(args, fail_if_called: dict[str, str]) -> ChildResult:
    """`ttt ARGS` in a child process without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (as root)."""
    stubs = "".join(
        f"import {mod}\n"
        f"{mod}.{attr} = lambda *a, **k: sys.exit({msg!r})\n"
        for mod, attr, msg in ((k.rsplit(".", 1)[0], k.rsplit(".", 1)[1], v) for k, v in fail_if_called.items()))
    code = f"import sys\n{stubs}from ttt_cli.cli.app import main\nsys.argv[0] = 'ttt'\nmain()\n"
    r = subprocess.run([*SETPRIV, sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    return ChildResult(r.returncode, r.stdout, r.stderr)


@dataclass
class ReadOnly:
    """A directory the command under test cannot write into, and how to run that command (`cli`)."""
    path: Path
    child: bool  # the command runs in a child process without the capabilities root uses to ignore permissions

    def cli(self, *args, fail_if_called: dict[str, str] | None = None) -> tp.Any:
        """Runs `ttt ARGS` as `cli` does; `fail_if_called` = {"module.function": message}: calling that function
        makes the run fail with the message (in-process: an exception; in a child: exit 1)."""
        if self.child:
            return _child_cli(args, fail_if_called or {})
        import pytest
        with pytest.MonkeyPatch.context() as mp:
            for target, msg in (fail_if_called or {}).items():
                mp.setattr(target, lambda *a, _m=msg, **k: pytest.fail(_m))
            return cli(*args)


@contextlib.contextmanager
def read_only_dir(target: Path):
    """Yields a `ReadOnly`: `target` made read-only (mode 0555); as root, its `cli` runs the command in a child
    process that obeys permission bits (see the module's docstring). The OS's words: "Permission denied"."""
    child = os.geteuid() == 0
    if child and (why := _setpriv_problem()):
        import pytest
        pytest.skip(f"running as root and {why}: a read-only directory cannot be made here "
                    "(scripts/check-tools.sh installs util-linux)")
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o555)
    try:
        yield ReadOnly(target, child)
    finally:
        target.chmod(0o755)
