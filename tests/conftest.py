"""Shared fixtures: an isolated preset cache (removed at the end) and the offline `tiny` models."""

import os
import shutil
import sys
import tempfile

import pytest

# Isolated cache for the whole session: presets are rebuilt once per test run (seconds), so the
# suite also checks that they build from nothing. A cache given by the caller is kept.
if "TTT_CACHE" not in os.environ:
    os.environ["TTT_CACHE"] = tempfile.mkdtemp(prefix="ttt-test-cache-")
    _OWN_CACHE = os.environ["TTT_CACHE"]
else:
    _OWN_CACHE = None
os.environ.setdefault("NO_TORCH_COMPILE", "1")
# One intra-op thread (before torch is imported; subprocesses inherit it): the test models are tiny, so a
# second thread buys nothing, and on a busy machine OpenMP's spin-waiting made tests 5-10x slower. The
# second core runs the suite's subprocesses. Override by setting OMP_NUM_THREADS.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # a plugin imported torch before this file: the variable alone would come too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_report_header(config):
    import torch
    return f"torch intra-op threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"


# Files that keep a worker busy for half a minute or more (real torchrun jobs, ttt bench's scale-out run):
# collected first, so that `--dist loadfile` starts them first and the short files fill in around them.
# Left for last, one of them alone decided the suite's wall time. Only the order changes (stable within a file).
LONG_FILES = ("test_distributed.py", "test_distributed_files.py", "test_bench.py")


def pytest_collection_modifyitems(session, config, items):
    # A shuffled run (`-p randomly`, which reorders first) stays shuffled within each of the two groups.
    items.sort(key=lambda item: item.path.name not in LONG_FILES)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    from ttt_cli import load_model
    return load_model("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_stt():
    from ttt_cli import load_model
    return load_model("tiny-stt", device="cpu", dtype="fp32")
