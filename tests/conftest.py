"""Shared fixtures: an isolated preset cache and the offline `tiny` models."""

import os
import tempfile

import pytest

# Isolated cache for the whole session (presets are rebuilt once per test run, in seconds).
os.environ.setdefault("TTT_CACHE", tempfile.mkdtemp(prefix="ttt-test-cache-"))
os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture(scope="session")
def tiny():
    from ttt_cli import load_model
    return load_model("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_stt():
    from ttt_cli import load_model
    return load_model("tiny-stt", device="cpu", dtype="fp32")
