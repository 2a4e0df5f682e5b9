"""The run's own setup (SPEC §5, §7): `ttt --version`, and a cache that cannot be written (exit 2, naming it)."""

import json
import re
from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

from safety_helpers import clip
from ttt_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def test_version_names_the_tool_moshi_and_torch():
    import moshi
    import torch
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    own = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert r.stdout.strip() == f"ttt {own} (moshi {moshi.__version__}, torch {torch.__version__})"
    # the installed distributions agree (torch's module version may add its build tag, e.g. +cu128)
    assert moshi.__version__ == metadata.version("moshi") and torch.__version__.startswith(metadata.version("torch"))


def test_an_unwritable_cache_is_a_setup_error_naming_the_variable_and_the_path(tmp_path, monkeypatch):
    """Unwritable for root too: a path below a plain file (ENOTDIR)."""
    wav = clip(tmp_path / "a.wav")
    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    monkeypatch.setenv("TTT_CACHE", str(cache))
    r = CliRunner().invoke(app, ["infer", str(wav), "--model", "tiny", "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 2, r.output
    msg = json.loads(r.stdout)["error"]["message"]
    assert f"TTT_CACHE={cache} cannot be written" in msg and "Set TTT_CACHE to a directory you may write" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()
    # without TTT_CACHE: the default place is named, and the variable that chooses another
    monkeypatch.delenv("TTT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "xdg"))
    r = CliRunner().invoke(app, ["init-checkpoint", "--preset", "tiny", "--out", str(tmp_path / "ck")])
    assert r.exit_code == 2, r.output
    assert f"{tmp_path / 'file' / 'xdg' / 'ttt'} (the default when TTT_CACHE is not set" in r.output
    assert not (tmp_path / "ck").exists()
