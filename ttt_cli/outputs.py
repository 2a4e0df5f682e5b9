"""What a run may write: one guard for every command (SPEC §7.1); what became of each input is `ledger`'s.

`OutputPlan` is built by each command from its inputs and its planned outputs, and checked
before any work: an output that is, contains or would overwrite an input, an output inside an
input tree (a dataset, a `--from` checkpoint), two outputs at one path, an existing file that
this tool did not write, or an output directory that cannot be written is refused (exit 2),
`--overwrite` or not. `--overwrite` replaces only files recognised as this tool's own (by name
and by their contents: a results JSON, a snapshot's metadata, a checkpoint's `ttt` section).

`InputLedger` accounts for every input: each ends in exactly one of done or skipped with a
reason (inputs never reached after a fault are skipped as "not run"); commands report from it. It lives
in `ttt_cli.ledger` and is re-exported here, where commands import it from.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from .errors import OutputError
from .io import TMP_TAG, check_writable_dir, shown
from .ledger import InputLedger, InputRecord  # noqa: F401  (re-exported: commands import them from here)

Recogniser = tp.Callable[[Path], bool]


def real(path: Path | str) -> str:
    """The absolute path with symlinks resolved (also for paths that do not exist yet)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def inside(a: str, b: str) -> bool:
    """Real path `a` is strictly inside directory `b`.

    Args:
        a, b: real paths (`real`).
    """
    return a != b and a.startswith(b.rstrip(os.sep) + os.sep)


def _same(a: Path, ra: str, b: Path, rb: str) -> bool:
    if ra == rb:
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


# -- recognising this tool's own files -------------------------------------------------------------

def json_with_keys(*keys: str) -> Recogniser:
    """A JSON object holding all of `keys` (how results JSON files of this tool are recognised)."""
    def ours(p: Path) -> bool:
        try:
            if p.stat().st_size > 256 * 2**20:
                return False
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return ours


def safetensors_with_metadata(key: str) -> Recogniser:
    """A safetensors file whose header metadata holds `key` (snapshots: `ttt_state`; token NLL: `ttt_eval`)."""
    def ours(p: Path) -> bool:
        try:
            with safe_open(str(p), framework="pt") as f:
                return key in (f.metadata() or {})
        except Exception:  # not safetensors at all: not ours
            return False
    return ours


def named_in(record: Path, recogniser: Recogniser, key: str = "outputs") -> Recogniser:
    """A file that a record of ours (e.g. infer's `<stem>.json`) names among its outputs."""
    def ours(p: Path) -> bool:
        if not recogniser(record):
            return False
        try:
            outs = json.loads(record.read_text(encoding="utf-8")).get(key) or {}
        except (OSError, ValueError, AttributeError):
            return False
        return any(Path(str(v)).name == p.name for v in (outs.values() if isinstance(outs, dict) else outs))
    return ours


def beside(record: Path, recogniser: Recogniser) -> Recogniser:
    """A file that is ours when a record of ours sits beside it (e.g. curve.csv next to results.json)."""
    return lambda p: recogniser(record)


# -- the plan --------------------------------------------------------------------------------------

@dataclass
class _Input:
    path: Path
    real: str
    what: str
    tree: bool  # a directory all of whose content is input


@dataclass
class _Output:
    path: Path
    real: str
    flag: str
    what: str
    kind: str                 # "file" | "dir" (written into) | "tree" (replaced whole)
    ours: Recogniser | None   # recognises an existing file/tree as this tool's own


@dataclass
class OutputPlan:
    """Inputs and planned outputs of one run; `check()` refuses what could lose or mix up user files.

    Args:
        overwrite: `--overwrite` was given (replace this tool's own earlier outputs).
    """

    overwrite: bool = False
    inputs: list[_Input] = field(default_factory=list)
    outputs: list[_Output] = field(default_factory=list)
    created: list[Path] = field(default_factory=list)

    # -- declaring ---------------------------------------------------------------------------------
    def read(self, path: Path | str | None, what: str = "an input", tree: bool = False) -> None:
        """Declares an input file (or, with `tree`, a directory whose whole content is input)."""
        if path is None or os.fspath(path) == "":
            return
        p = Path(path)
        self.inputs.append(_Input(p, real(p), what, tree))

    def read_model(self, source: str | None) -> None:
        """Declares a local checkpoint directory's files as inputs (presets and hub ids live in caches)."""
        if not source:
            return
        p = Path(source).expanduser()
        if p.is_dir():
            try:
                files = [c for c in p.iterdir() if c.is_file()]
            except OSError:
                files = []
            for c in files:
                self.read(c, f"a file of checkpoint {shown(p)}")
            self.inputs.append(_Input(p, real(p), f"checkpoint {shown(p)}", False))
        elif p.is_file():
            self.read(p, "the checkpoint file")

    def write(self, path: Path | str, flag: str = "--out", what: str = "output", ours: Recogniser | None = None) -> None:
        """Declares an output file; `ours` recognises an existing one as this tool's (replaceable with --overwrite).

        Args:
            path: the file.
            flag: the option that sets where it goes (named in messages).
            what: what it is, e.g. "the .wav output of talk.wav" (named in messages).
            ours: recognises an existing file there as written by this tool.
        """
        p = Path(path)
        self.outputs.append(_Output(p, real(p), flag, what, "file", ours))

    def write_into(self, path: Path | str, flag: str = "--out") -> None:
        """Declares a directory that outputs are written into (its other content is left alone)."""
        p = Path(path)
        self.outputs.append(_Output(p, real(p), flag, "output directory", "dir", None))

    def replace_tree(self, path: Path | str, flag: str = "--out", what: str = "output directory",
                     ours: Recogniser | None = None) -> None:
        """Declares a directory that is written whole and replaces an existing one (init-checkpoint)."""
        p = Path(path)
        self.outputs.append(_Output(p, real(p), flag, what, "tree", ours))

    # -- checking ----------------------------------------------------------------------------------
    def check(self) -> "OutputPlan":
        """Refuses, before any work, every output that could destroy or mix up a file (OutputError, exit 2)."""
        for o in self.outputs:
            for i in self.inputs:
                _refuse_input_clash(o, i)
        self._check_duplicates()
        for o in self.outputs:
            self._check_existing(o)
        return self

    def _check_duplicates(self) -> None:
        seen: dict[str, _Output] = {}
        for o in self.outputs:
            if o.kind != "file":
                continue
            prev = seen.get(o.real)
            if prev is not None:
                raise OutputError(f"{prev.what} ({prev.flag}) and {o.what} ({o.flag}) would both be written to "
                                  f"{shown(o.path)}; choose other output paths, or rename one of the inputs.",
                                  hint="give outputs that do not collide")
            seen[o.real] = o

    def _check_existing(self, o: _Output) -> None:
        p = o.path
        if not (p.exists() or p.is_symlink()):
            return
        if o.kind == "dir":
            if not p.is_dir():
                raise OutputError(f"{o.flag} {shown(p)} is a file; it must be a directory. Choose another {o.flag}.")
            return
        if o.kind == "file" and p.is_dir() and not p.is_symlink():
            raise OutputError(f"{shown(p)} ({o.what}) is a directory; ttt would have to write a file there. Move it "
                              f"away or choose another {o.flag}.")
        if o.kind == "tree":
            if not p.is_dir():
                raise OutputError(f"{o.flag} {shown(p)} is a file; it must be a directory (new, or one ttt wrote). "
                                  f"Choose another {o.flag}.")
            if not any(p.iterdir()):
                return
        ours = o.ours is not None and o.ours(p)
        if not ours:
            raise OutputError(f"{shown(p)} exists and was not written by ttt ({o.what}); ttt never replaces files it "
                              f"did not write, with or without --overwrite. Move it away or choose another {o.flag}.",
                              hint=f"choose another {o.flag}")
        if not self.overwrite:
            raise OutputError(f"{shown(p)} exists ({o.what} of an earlier ttt run); pass --overwrite to replace it, "
                              f"or choose another {o.flag}.", hint="pass --overwrite to replace ttt's earlier outputs")

    # -- preparing ---------------------------------------------------------------------------------
    def prepare(self) -> "OutputPlan":
        """Creates the output directories (user's umask) and checks they can be written (ConfigError, exit 2)."""
        dirs: dict[str, tuple[Path, str]] = {}
        for o in self.outputs:
            d = o.path if o.kind == "dir" else (o.path.parent if str(o.path.parent) else Path("."))
            dirs.setdefault(real(d), (d, o.flag))
        try:
            for d, flag in dirs.values():
                made = _missing(d)
                try:
                    check_writable_dir(d, flag)
                finally:
                    self.created += [x for x in made if x.is_dir()]
        except BaseException:
            self.cleanup()  # a refused run leaves no empty directory behind
            raise
        return self

    def cleanup(self) -> None:
        """Removes the directories `prepare` created that are still empty (a run that wrote nothing)."""
        for d in sorted(self.created, key=lambda p: len(p.parts), reverse=True):
            try:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            except OSError:
                pass


def _refuse_input_clash(o: _Output, i: _Input) -> None:
    """Refuses output `o` where it is input `i`, lies inside an input tree, or would replace a tree holding `i`."""
    same = _same(o.path, o.real, i.path, i.real)
    if o.kind == "file" and same and not i.tree:
        named = "" if _same(o.path, o.real, i.path, i.real) and o.path == i.path else f" ({shown(i.path)})"
        raise OutputError(f"{shown(o.path)} ({o.what}, from {o.flag}) is {i.what}{named}: ttt never writes "
                          f"over its inputs, with or without --overwrite. Choose another {o.flag}.",
                          hint=f"give {o.flag} a path that is not one of the inputs")
    if i.tree and (same or inside(o.real, i.real)):
        where = "is" if same else "is inside"
        raise OutputError(f"{o.flag} {shown(o.path)} {where} {i.what} ({shown(i.path)}): outputs would "
                          f"mix with or replace the input files, with or without --overwrite. Choose an "
                          f"{o.flag} outside it.", hint=f"give {o.flag} a path outside {shown(i.path)}")
    if o.kind == "tree" and (same or inside(i.real, o.real)):
        what = "is" if same else "contains"
        raise OutputError(f"{o.flag} {shown(o.path)} {what} {i.what} ({shown(i.path)}): writing it would "
                          f"replace that input, with or without --overwrite. Choose another {o.flag}.",
                          hint=f"give {o.flag} a new directory that holds no input")


def _missing(d: Path) -> list[Path]:
    out, p = [], Path(os.path.abspath(d))
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


# -- what a path is, for input checks --------------------------------------------------------------

def input_problem(path: Path | str) -> str | None:
    """Why `path` cannot be read as an input file, or None: missing, symlink loop, directory, FIFO, device."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (it points back to itself)"
        if e.errno == errno.ENOENT:
            return "is a broken symbolic link (its target does not exist)" if os.path.islink(p) else "no such file"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        return e.strerror or str(e)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "is a directory, not an audio file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a regular file; ttt reads files it can seek in"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if not os.access(p, os.R_OK):
        return "permission denied (not readable)"
    return None


def is_temporary(name: str) -> bool:
    """A temporary name of `ttt_cli.io` (for tests and cleanup checks)."""
    return TMP_TAG in name
