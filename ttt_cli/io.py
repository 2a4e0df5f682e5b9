"""Atomic writes with cleanup on every exit path, and OS errors in user words (SPEC §7, §7.1).

Every file the tool writes goes through `atomic_path` (or `atomic_write` / `write_text` /
`write_json` built on it): the writer fills a temporary name in the destination's directory, which
is renamed onto the destination only when the writer returned. On any other exit (an exception,
Ctrl-C, a full disk) the temporary is removed and an existing destination is left as it was, so no
partial file is ever visible under a final name and no temporary stays behind. Directories are
built the same way (`atomic_dir`). Files and directories are created with the user's umask.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import typing as tp
import uuid
from pathlib import Path

from .errors import ConfigError

TMP_TAG = ".ttt-tmp-"  # part of every temporary name: `.<name>.ttt-tmp-<pid>-<random>`
_OS_ERROR = re.compile(r"os error (\d+)|errno (\d+)|\[Errno (\d+)\]", re.IGNORECASE)
_ERRNO_WORDS = (("no space left", errno.ENOSPC), ("read-only file system", errno.EROFS),
                ("permission denied", errno.EACCES), ("disk quota", errno.EDQUOT))


def shown(text: str | os.PathLike) -> str:
    """Text (a path, a message) that can always be printed and stored as UTF-8 JSON: bytes of a file name
    that are not UTF-8 (surrogate escapes) become U+FFFD."""
    return os.fspath(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def as_os_error(e: BaseException, path: Path | str | None = None) -> OSError | None:
    """The OSError behind an exception raised by a foreign writer, or None if it is not an I/O failure.

    sphn's wav writer, safetensors and others report a failed write as ValueError / RuntimeError
    / their own type with the OS message inside ("No space left on device (os error 28)"); these
    are I/O failures and must be handled as such, not escape as tracebacks.
    """
    if isinstance(e, OSError):
        return e
    text = str(e)
    m = _OS_ERROR.search(text)
    code = next((int(g) for g in m.groups() if g), None) if m else None
    if code is None:
        code = next((c for words, c in _ERRNO_WORDS if words in text.lower()), None)
    if code is None:
        return None
    return OSError(code, os.strerror(code), None if path is None else str(path))


def describe_os_error(e: OSError, path: Path | str | None = None) -> str:
    """One sentence: what failed where, and what to do about it."""
    where = path if path is not None else e.filename
    what = e.strerror or str(e)
    if where is None:
        return f"cannot write: {what}"
    hint = {errno.ENOSPC: "free some space or write elsewhere",
            errno.EDQUOT: "free some space or write elsewhere",
            errno.EROFS: "the file system is read-only: write elsewhere",
            errno.EACCES: "you may not write there: write elsewhere or change its permissions",
            errno.EPERM: "you may not write there: write elsewhere or change its permissions",
            errno.ENOTDIR: "a part of that path is a file, not a directory",
            errno.EISDIR: "a directory is in the way",
            errno.ENAMETOOLONG: "use a shorter name"}.get(e.errno or 0, "")
    return f"cannot write {shown(where)}: {what}" + (f" ({hint})" if hint else "")


@contextlib.contextmanager
def atomic_path(path: Path | str) -> tp.Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` when the block completes.

    Args:
        path: the destination file (its parent directory is created if missing).
    Raises:
        OSError: the write failed (foreign writers' I/O errors are converted, see `as_os_error`);
            the temporary is gone and `path` is unchanged.
    """
    path = Path(path)
    mkdirs(path.parent)
    tmp = _tmp_name(path)
    try:
        try:
            yield tmp
        except Exception as e:
            ose = as_os_error(e, path)
            if ose is None:
                raise
            if ose is e:
                if not e.filename or str(e.filename) == str(tmp):
                    e.filename = str(path)  # name the file the user asked for, not our temporary
                raise
            raise ose from e
        os.replace(tmp, path)
    finally:
        _remove(tmp)


class PendingFile:
    """A file written over a long run under a temporary name beside `path` (`atomic_path`'s long-lived form).

    `commit()` renames it onto `path`; `discard()` removes it (idempotent, never raises). Used for
    outputs produced as a run goes (a generated `.wav`), so that nothing partial is visible under
    the final name while they grow, and nothing stays behind when the run fails.

    Args:
        path: the destination file (its parent directory is created if missing).
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        mkdirs(self.path.parent)
        self.tmp = _tmp_name(self.path)
        self.done = False

    def commit(self) -> Path:
        """Renames the temporary onto `path` (OSError naming `path` on failure; the temporary is removed)."""
        if self.done:
            raise RuntimeError(f"{self.path}: already committed or discarded")
        try:
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            e.filename = str(self.path)
            raise
        self.done = True
        return self.path

    def discard(self) -> None:
        if not self.done:
            self.done = True
            _remove(self.tmp)


def atomic_write(path: Path | str, write: tp.Callable[[Path], None]) -> Path:
    """Calls `write(tmp_path)` then renames onto `path`; nothing half-written is ever left (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj: tp.Any) -> Path:
    return write_text(path, shown(json.dumps(obj, indent=2, ensure_ascii=False)) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path | str, replace: bool = False) -> tp.Iterator[Path]:
    """Yields a temporary directory beside `path`, moved onto `path` when the block completes.

    Args:
        path: the destination directory.
        replace: an existing `path` is swapped out and removed after the new one is in place
            (the caller has checked that it may be removed, see `ttt_cli.outputs`).
    """
    path = Path(path)
    mkdirs(path.parent)
    tmp = _tmp_name(path)
    os.mkdir(tmp)  # the user's umask (tempfile.mkdtemp would make it 0700)
    old = None
    try:
        try:
            yield tmp
        except Exception as e:
            ose = as_os_error(e, path)
            if ose is None or ose is e:
                raise
            raise ose from e
        if path.exists() or path.is_symlink():
            if not replace:
                raise FileExistsError(errno.EEXIST, "exists", str(path))
            old = _tmp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        if old is not None:
            _remove(old)


def _remove(p: Path) -> None:
    """Removes a file or directory tree of ours; never raises (used on cleanup paths)."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def mkdirs(path: Path | str) -> list[Path]:
    """Creates `path` and missing parents with the user's umask; returns the directories it created."""
    path = Path(path)
    created: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    for d in reversed(created):
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
    return list(reversed(created))


def check_writable_dir(path: Path | str, flag: str = "--out") -> Path:
    """Creates `path` if needed and checks that files can be written there (probe file removed)."""
    path = Path(path)
    try:
        mkdirs(path)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        probe = _tmp_name(path / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        what = describe_os_error(e, path).removeprefix(f"cannot write {shown(path)}: ")
        raise ConfigError(f"cannot write to the output directory {shown(path)} ({flag}): {what}. Choose another "
                          f"{flag}.", hint=f"give {flag} a directory you can write to") from None
    return path
