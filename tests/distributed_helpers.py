"""What the scale-out tests share: a torchrun job as a user runs it, the same command in one process (the
reference), and comparisons of their JSON up to float summation order and wall-clock figures."""

import math
import os
import subprocess
import sys

from typer.testing import CliRunner

from ttt_cli.cli.app import app
from ttt_cli.distributed import DEFAULT_TIMEOUT

REL = 1e-6   # SPEC §5.6: equal up to float summation order


def torchrun(n: int, *args, env: dict | None = None, timeout: float = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m ttt_cli ARGS` as a user runs it (README: scale-out).

    The wall-clock limit only ends a hung job: a job takes 10-40 s on 2 busy cores, the limit is the tool's
    own default --dist-timeout, so a loaded machine never fails for being slow."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "ttt_cli",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def single(*args):
    """The same command in one process, no torchrun (the reference)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def close(a, b, path=""):
    """Asserts two JSON values equal, floats within REL (relative)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
        # a difference of two NLLs (vs_off) is as exact as the NLLs themselves (a few nats), not relative to itself
        floor = 10.0 if "vs_off" in path else 1e-12
        assert abs(a - b) <= REL * max(abs(a), abs(b), floor), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def untimed(d):
    """Drops wall-clock figures (they differ between runs); everything else must match."""
    if isinstance(d, dict):
        return {k: untimed(v) for k, v in d.items()
                if k not in ("timing", "seconds_wall", "encode_seconds", "codes_cache_hit")}
    if isinstance(d, list):
        return [untimed(v) for v in d]
    return d
