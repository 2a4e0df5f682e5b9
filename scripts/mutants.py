"""Mutation check: applies each deliberate break of scripts/mutants.tsv in a throw-away copy and runs its tests."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "scripts" / "mutants.tsv"
PYTEST_FLAGS = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-n", "0"]


@dataclass
class Mutant:
    """One deliberate break: replace `find` (which must occur exactly once in `path`) by `replace`."""

    id: str
    path: str
    find: str
    replace: str
    tests: list[str]
    line: int


def unescape(s: str) -> str:
    """The list's escapes: \\n newline, \\t tab, \\\\ backslash (anything else stays as written)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def read_list(path: Path) -> list[Mutant]:
    """Parses the list (format at its top). A malformed line is an error naming the line."""
    mutants, seen = [], set()
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = raw.split("\t")
        if len(parts) != 5:
            sys.exit(f"{path.name}:{n}: expected 5 tab-separated fields, found {len(parts)}")
        mid, file, find, repl, tests = parts
        if mid in seen:
            sys.exit(f"{path.name}:{n}: duplicate id {mid}")
        seen.add(mid)
        mutants.append(Mutant(mid, file, unescape(find), unescape(repl), shlex.split(tests), n))
    return mutants


def make_copy(dest: Path) -> None:
    """Copies the tracked files of the checkout (as they are in its working tree) into `dest`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in files.decode().split("\0"):
        src = ROOT / rel
        if rel and src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(copy), NO_TORCH_COMPILE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("TTT_CACHE", None)  # each pytest run builds its presets from this copy's code, in its own cache
    return env


def check_imports(python: str, copy: Path) -> None:
    """The copy must import its own code, not the checkout's (else every break would be 'missed')."""
    code = "import ttt_cli, evals; print(ttt_cli.__file__); print(evals.__file__)"
    out = subprocess.run([python, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        sys.exit(f"the copy does not import its own code: {out.stdout}{out.stderr}")


RUNNING: set[subprocess.Popen] = set()  # pytest processes now running (stopped on Ctrl-C or SIGTERM)
STOP = threading.Event()


def pytest(python: str, copy: Path, tests: list[str], log: Path, first_failure: bool = True) -> int:
    flags = PYTEST_FLAGS if first_failure else [f for f in PYTEST_FLAGS if f != "-x"]
    if STOP.is_set():
        return -1
    with open(log, "w") as fh:
        proc = subprocess.Popen([python, "-m", "pytest", *flags, *tests], cwd=copy, env=env_for(copy),
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.add(proc)
        try:
            return proc.wait()
        finally:
            RUNNING.discard(proc)


def stop_all() -> None:
    """Stops every running pytest (and what it started: each runs in its own process group)."""
    STOP.set()
    for proc in list(RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in list(RUNNING):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def stale_reason(copy: Path, m: Mutant) -> str | None:
    f = copy / m.path
    if not f.is_file():
        return "file not found"
    n = f.read_text(encoding="utf-8").count(m.find)
    if n != 1:
        return "snippet not found" if n == 0 else f"snippet occurs {n} times"
    return None


def run_one(python: str, copy: Path, m: Mutant, logdir: Path) -> tuple[str, str]:
    """Applies `m` in `copy`, runs its tests, restores the file. Returns (verdict, note)."""
    reason = stale_reason(copy, m)
    if reason:
        return "stale", reason
    f = copy / m.path
    original = f.read_text(encoding="utf-8")
    try:
        f.write_text(original.replace(m.find, m.replace), encoding="utf-8")
        if m.path.endswith(".py"):
            c = subprocess.run([python, "-c", "import ast, sys; ast.parse(open(sys.argv[1]).read())", str(f)],
                               capture_output=True, text=True)
            if c.returncode:  # a syntax error would be 'caught' by any test: the entry is wrong
                return "invalid", "the mutated file does not parse"
        log = logdir / f"{m.id}.log"
        rc = pytest(python, copy, m.tests, log)
    finally:
        f.write_text(original, encoding="utf-8")
    if rc == 1:
        return "caught", ""
    if rc == 0:
        return "missed", ""
    return "error", f"pytest exit {rc}, see {log}"  # 2-5: usage/collection problems, not a caught break


class Copies:
    """One throw-away copy of the checkout per worker, handed out to one run at a time."""

    def __init__(self, work: Path, jobs: int, python: str):
        self.free = []
        for j in range(jobs):
            copy = work / f"repo{j}"
            make_copy(copy)
            check_imports(python, copy)
            self.free.append(copy)
        self.lock = threading.Lock()

    def take(self) -> Path:
        with self.lock:
            return self.free.pop()

    def give(self, copy: Path) -> None:
        with self.lock:
            self.free.append(copy)


def in_parallel(jobs: int, copies: Copies, items: list, fn) -> list:
    """fn(copy, item) for every item, `jobs` at a time, each on a copy of its own; results in item order."""
    def one(item):
        copy = copies.take()
        try:
            return fn(copy, item)
        finally:
            copies.give(copy)
    ex = ThreadPoolExecutor(jobs)
    try:
        futures = [ex.submit(one, item) for item in items]
        return [f.result() for f in futures]
    except BaseException:
        stop_all()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def baseline(python: str, copies: Copies, jobs: int, mutants: list[Mutant], logdir: Path) -> set[tuple[str, ...]]:
    """Runs each distinct test selection on an unmodified copy, exactly as a break's run will (its own
    pytest process: a union run would change the tests' order and module fixtures). Returns the
    selections that fail there: a break whose tests fail unmodified gets no verdict."""
    selections = list(dict.fromkeys(tuple(m.tests) for m in mutants))
    t0 = time.monotonic()

    def run(copy: Path, item: tuple[int, tuple[str, ...]]) -> int:
        i, tests = item
        rc = pytest(python, copy, list(tests), logdir / f"baseline-{i}.log", first_failure=False)
        if rc != 0 and not STOP.is_set():
            print(f"baseline FAIL (exit {rc}, see baseline-{i}.log): {' '.join(tests)}", flush=True)
        return rc
    rcs = in_parallel(jobs, copies, list(enumerate(selections)), run)
    failing = {t for t, rc in zip(selections, rcs) if rc != 0}
    print(f"baseline: {len(selections) - len(failing)} / {len(selections)} test selections pass unmodified"
          f"  {time.monotonic() - t0:.0f}s", flush=True)
    return failing


def verdicts_of(mutants: list[Mutant], jobs: int, work: Path, logdir: Path) -> dict[str, str]:
    """Copies, baseline, then each break in a copy of its own; prints each verdict as it comes."""
    python = str(ROOT / ".venv" / "bin" / "python")
    copies = Copies(work, jobs, python)
    failing = baseline(python, copies, jobs, [m for m in mutants if not stale_reason(ROOT, m)], logdir)

    def run(copy: Path, m: Mutant) -> str:
        t0 = time.monotonic()
        if tuple(m.tests) in failing:
            verdict, note = "no-baseline", "its tests fail on the unmodified copy"
        else:
            verdict, note = run_one(python, copy, m, logdir)
        if not STOP.is_set():  # a run stopped by Ctrl-C has no verdict to print
            print(f"{m.id:30} {verdict:7} {time.monotonic() - t0:5.0f}s  {note}".rstrip(), flush=True)
        return verdict
    return dict(zip((m.id for m in mutants), in_parallel(jobs, copies, mutants, run)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", help="comma-separated ids to run")
    p.add_argument("--list", action="store_true", help="print the entries and whether each applies, then exit")
    p.add_argument("--jobs", type=int, default=2, help="breaks run at once, each in its own copy (default 2)")
    p.add_argument("--keep-logs", action="store_true", help="keep the pytest logs (their folder is printed)")
    args = p.parse_args()
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))  # so that the copies are removed on kill too
    mutants = read_list(LIST)
    if args.only:
        want = args.only.split(",")
        unknown = [w for w in want if w not in {m.id for m in mutants}]
        if unknown:
            print(f"unknown ids: {', '.join(unknown)}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in want]
    if args.list:
        for m in mutants:
            print(f"{m.id:30} {m.path:40} {stale_reason(ROOT, m) or 'applies'}  -> {' '.join(m.tests)}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ttt-mutants-"))
    logdir = work / "logs"
    logdir.mkdir()
    t_start = time.monotonic()
    try:
        verdicts = verdicts_of(mutants, args.jobs, work, logdir)
        caught = sum(v == "caught" for v in verdicts.values())
        others = {v: sum(x == v for x in verdicts.values()) for v in ("missed", "stale", "invalid", "error", "no-baseline")}
        rest = ", ".join(f"{k} {n}" for k, n in others.items() if n)
        print(f"caught {caught} / {len(mutants)}" + (f" ({rest})" if rest else "") +
              f" in {time.monotonic() - t_start:.0f}s", flush=True)
        return 0 if caught == len(mutants) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep_logs:
            for d in work.glob("repo*"):
                shutil.rmtree(d, ignore_errors=True)
            print(f"logs kept in {logdir}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
