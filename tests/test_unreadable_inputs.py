"""An unreadable input among good ones (SPEC §7): reported with its reason and skipped, the rest run, exit 1 --
for every command that takes input files, and for the folders `eval` discovers.

Permissions only mean something to a process they bind: the tests run as root here, and root reads anything.
So the commands run in a child process that file permissions bind: as root, with the capabilities that bypass
them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) dropped from its bounding set by util-linux's `setpriv`; as
another user, as it is. The child first checks that it really cannot read the locked file.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from safety_helpers import clip

CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from typer.testing import CliRunner
    from ttt_cli.cli.app import app
    from ttt_cli.errors import ConfigError
    from evals.librilight.data import discover
    from evals.asr.data import discover_asr

    d = Path(sys.argv[1])
    out = {}
    try:
        open(d / "locked.wav", "rb").close()
        out["locked_readable"] = True
    except PermissionError:
        out["locked_readable"] = False

    def run(name, *args):
        r = CliRunner().invoke(app, [*map(str, args), "--json"])
        out[name] = {"code": r.exit_code, "stdout": r.stdout}

    def step(name, fn):  # one part's crash fails its own test, not the others'
        try:
            out[name] = fn()
        except Exception as e:
            out[name] = {"crash": f"{type(e).__name__}: {e}"}

    run("infer", "infer", d / "good.wav", d / "locked.wav", d / "good2.wav", "--model", "tiny", "--greedy",
        "--out", d / "infer")
    run("export", "export-state", d / "good.wav", d / "locked.wav", d / "good2.wav", "--model", "tiny",
        "--out", d / "states")
    run("inspect", "inspect-state", d / "locked.safetensors")
    run("diff", "diff-state", d / "states" / "good.end.safetensors", d / "locked.safetensors")
    run("init_state", "infer", d / "good.wav", "--init-state", d / "locked.safetensors", "--model", "tiny",
        "--out", d / "infer-init")
    run("eval_locked_data", "eval", "librilight", d / "locked-data", "--model", "tiny", "--out", d / "eval")

    def books():
        ds = discover(d / "books")
        return {"documents": [x.id for x in ds.documents],
                "failed": {Path(f.path).relative_to(d / "books").as_posix(): f.reason
                           for f in ds.failed_files + [s for x in ds.documents for s in x.skipped]}}

    def asr():
        ds = discover_asr(d / "asr")
        return {"items": [i.key for i in ds.items],
                "skipped": {Path(s.path).relative_to(d / "asr").as_posix(): s.reason for s in ds.skipped}}

    def asr_locked_data():
        try:
            discover_asr(d / "locked-data")
        except ConfigError as e:
            return str(e)

    step("books", books)
    step("asr", asr)
    step("asr_locked_data", asr_locked_data)
    print(json.dumps(out))
""")


def unprivileged(cmd: list[str]) -> list[str]:
    """`cmd` as a process that file permissions bind (see the module docstring)."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    assert setpriv, "tests run as root need util-linux's setpriv to drop CAP_DAC_OVERRIDE (apt install util-linux)"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *cmd]


def lock(path):
    path.chmod(0)
    return path


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    d = tmp_path_factory.mktemp("unreadable")
    good, good2 = clip(d / "good.wav", 0.0, 1.0), clip(d / "good2.wav", 1.0, 1.0)
    lock(clip(d / "locked.wav", 0.5, 1.0))
    (d / "locked.safetensors").write_bytes(b"not read anyway")
    lock(d / "locked.safetensors")
    (d / "locked-data" / "sp" / "book").mkdir(parents=True)
    shutil.copy(good, d / "locked-data" / "sp" / "book" / "a.wav")
    lock(d / "locked-data")
    for book in ("b1", "b2", "b3"):
        (d / "books" / "sp" / book).mkdir(parents=True)
        shutil.copy(good, d / "books" / "sp" / book / "1.wav")
    lock(d / "books" / "sp" / "b2")                       # a book that cannot be listed
    shutil.copy(good2, d / "books" / "sp" / "b3" / "2.wav")
    lock(d / "books" / "sp" / "b3" / "2.wav")            # an unreadable file of a kept book
    (d / "asr" / "sub").mkdir(parents=True)
    for stem, src in (("a", good), ("b", good2), ("sub/c", good)):
        shutil.copy(src, d / "asr" / f"{stem}.wav")
        (d / "asr" / f"{stem}.txt").write_text("hello there\n")
    lock(d / "asr" / "b.wav")
    lock(d / "asr" / "sub")
    script = d / "child.py"
    script.write_text(CHILD)
    r = subprocess.run(unprivileged([sys.executable, str(script), str(d)]), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["locked_readable"] is False, "the child can read a file of mode 000: the test would prove nothing"
    return d, out


@pytest.mark.parametrize("command", ["infer", "export"])
def test_an_unreadable_file_among_good_ones_is_skipped_and_the_rest_run(child, command):
    d, out = child
    r = out[command]
    assert r["code"] == 1, r["stdout"]
    res = json.loads(r["stdout"])
    if command == "infer":
        inputs = res["inputs"]
        assert inputs["total"] == 3 and inputs["done"] == [str(d / "good.wav"), str(d / "good2.wav")]
        [skipped] = inputs["skipped"]
        assert skipped["path"] == str(d / "locked.wav") and skipped["failed"] and "permission denied" in skipped["reason"]
        assert [x["input"]["path"] for x in res["results"]] == [str(d / n) for n in ("good.wav", "locked.wav",
                                                                                     "good2.wav")]
        assert res["exit_code"] == 1 and res["results"][0]["steps"] > 0 and res["results"][2]["steps"] > 0
        assert {p.name for p in (d / "infer").iterdir()} >= {"good.json", "good.txt", "good2.json", "good2.txt"}
        assert not any(p.name.startswith("locked") for p in (d / "infer").iterdir())
    else:
        assert sorted(p.name for p in (d / "states").iterdir()) == ["good.end.safetensors", "good2.end.safetensors"]
        assert [(x["input"], x["ok"]) for x in res["items"]] == [(str(d / "good.wav"), True),
                                                                 (str(d / "locked.wav"), False),
                                                                 (str(d / "good2.wav"), True)]
        assert "permission denied" in res["items"][1]["error"]


@pytest.mark.parametrize("command", ["inspect", "diff", "init_state"])
def test_an_unreadable_snapshot_is_named_with_its_reason(child, command):
    """One snapshot is the whole input of these (a setup problem: exit 2), said by ttt, not by the parser."""
    d, out = child
    r = out[command]
    err = json.loads(r["stdout"])["error"]
    assert r["code"] == 2 and "locked.safetensors: permission denied" in err["message"], r


def test_eval_reports_folders_it_cannot_list(child):
    d, out = child
    assert out["eval_locked_data"]["code"] == 2
    assert "cannot read the dataset directory" in json.loads(out["eval_locked_data"]["stdout"])["error"]["message"]
    assert out["books"]["documents"] == ["sp/b1", "sp/b3"]
    assert set(out["books"]["failed"]) == {"sp/b2", "sp/b3/2.wav"}
    assert "cannot be listed" in out["books"]["failed"]["sp/b2"]
    assert "permission denied" in out["books"]["failed"]["sp/b3/2.wav"]
    assert out["asr"]["items"] == ["a.wav"] and set(out["asr"]["skipped"]) == {"b.wav", "sub"}
    assert "cannot be listed" in out["asr"]["skipped"]["sub"]
    assert "cannot read DATA" in out["asr_locked_data"]
