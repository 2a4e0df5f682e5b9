"""SPEC §7.1 for `ttt eval librilight` through the real CLI on `tiny`: the dataset is read-only, every file
is accounted for, codes-cache entries and resume records are verified, writing stops cleanly.

Reference for the numbers: a fresh run of the same command on the same (or the changed) data in
another directory; the cases assert exit codes, messages, the files left and the dataset's checksums.
"""

import json
import shutil

import pytest

from safety_helpers import cli, clip, lying_wav, names, no_temporaries, read_only_dir, small_disk, tree

BASE = ["--model", "tiny", "-p", "document", "--bin-seconds", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two books: s/a = 1.wav, 2.wav (holds 0.6 s, its header claims 4000 s), 10.wav; s/b = 1.wav."""
    root = tmp_path_factory.mktemp("ds") / "data"
    clip(root / "s" / "a" / "1.wav", 0.0, 0.8)
    lying_wav(root / "s" / "a" / "2.wav", 0.6, claims=4000.0)
    clip(root / "s" / "a" / "10.wav", 2.0, 0.8)
    clip(root / "s" / "b" / "1.wav", 3.0, 0.8)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("codes")


@pytest.fixture(scope="module")
def reference(data, cache, tmp_path_factory):
    """A complete run: (results.json, out dir)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = cli("eval", "librilight", data, *BASE, "--codes-cache", cache, "--out", out)
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text()), out


def run(data, cache, out, *extra, runner=cli):
    return runner("eval", "librilight", data, *BASE, "--codes-cache", cache, "--out", out, *extra)


def nll(results) -> float:
    return results["policies"]["document"]["nll"]


def test_header_that_lies_hides_no_later_file(reference):
    r, _ = reference
    a = [d for d in r["documents"] if d["id"] == "s/a"][0]
    assert [f["path"] for f in a["files"]] == ["s/a/1.wav", "s/a/2.wav", "s/a/10.wav"] and a["skipped"] == []
    assert "header declares 4000.00 s but only 0.60 s decode" in a["files"][1]["warnings"][0]
    assert any("header declares 4000.00 s" in w for w in r["warnings"])
    assert r["dataset"]["files"] == 4 and r["dataset"]["skipped_files"] == 0


def test_out_or_cache_inside_the_dataset_is_refused(data, cache, tmp_path):
    before = tree(data)
    for extra in (["--out", data / "s" / "results"], ["--out", data], ["--out", tmp_path / "o", "--codes-cache",
                                                                       data / "cache"]):
        r = cli("eval", "librilight", data, *BASE, *extra, "--overwrite", "--json")
        assert r.exit_code == 2, r.output
        msg = json.loads(r.stdout)["error"]["message"]
        assert ("is inside the dataset" in msg or "is the dataset" in msg) and "pass --overwrite" not in msg
    assert tree(data) == before and not (tmp_path / "o").exists()


def test_files_after_the_cut_and_beyond_the_limit_are_accounted(data, cache, tmp_path):
    r = run(data, cache, tmp_path / "o", "--max-seconds", "1.0", "--limit-books", "1", "--json")
    assert r.exit_code == 0, r.output  # excluded by options: reported, not failures
    res = json.loads(r.stdout)
    a = res["documents"][0]
    assert [f["path"] for f in a["files"]] == ["s/a/1.wav", "s/a/2.wav"] and a["files"][1]["truncated"]
    assert a["skipped"] == [{"path": "s/a/10.wav", "reason": "after the --max-seconds cut (1 s)", "failed": False}]
    b = [d for d in res["dataset"]["skipped_documents"] if d["id"] == "s/b"][0]
    assert b["reason"] == "beyond --limit-books 1" and [f["path"] for f in b["skipped"]] == ["s/b/1.wav"]
    r = run(data, cache, tmp_path / "p", "--max-seconds", "0.001")
    assert r.exit_code == 2 and "--max-seconds 0.001 leaves nothing to score" in r.stderr
    assert names(tmp_path) == {"o/", "o/results.json", "o/curve.csv", "o/curve.png", "o/.ttt-eval/",
                               "o/.ttt-eval/state.json"}


def _entries(cache):
    return sorted(cache.rglob("*.safetensors"))


def test_altered_or_out_of_range_cache_entries_are_never_scored(data, cache, reference, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from evals.librilight.codes_cache import payload_digest
    ref, _ = reference
    for n, how in enumerate(("altered", "out-of-range")):
        for path in _entries(cache):
            with safe_open(str(path), "pt") as f:
                header, codes = f.metadata(), f.get_tensor("codes")
            codes = codes.clone()
            if how == "altered":  # a few in-range codes changed, the checksum left as it was
                codes[0, :3] = (codes[0, :3] + 1) % 64
            else:  # out of range, with a checksum recomputed to match
                codes[1, 2] = 30000
                meta = json.loads(header["ttt_codes"])
                meta["payload_sha256"] = payload_digest(codes)
                header = {**header, "ttt_codes": json.dumps(meta)}
            save_file({"codes": codes}, str(path), metadata=header)
        r = run(data, cache, tmp_path / how, "--json")
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        words = "do not match their checksum" if how == "altered" else "codes out of range"
        assert sum(words in w and "encoded again" in w for w in res["warnings"]) == 2, res["warnings"]
        assert res["codes_cache"]["misses"] == 2 and nll(res) == pytest.approx(nll(ref), rel=1e-6)
        assert "Traceback" not in r.output
    again = run(data, cache, tmp_path / "again", "--json")  # the re-encoded entries were stored and verify
    assert json.loads(again.stdout)["codes_cache"]["hits"] == 2


def test_unwritable_cache_is_used_read_only(data, tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        r = run(data, ro.path, tmp_path / "o", "--json", runner=ro.cli)
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["codes_cache"]["read_only"] and r.stderr.count("new ones are not stored") == 1
        assert names(ro.path) == set()


def test_resume_checks_config_inputs_and_records(data, cache, reference, tmp_path):
    ref, ref_out = reference
    work, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(data, work)
    shutil.copytree(ref_out, out)
    r = cli("eval", "librilight", work, *BASE, "--codes-cache", cache, "--out", out, "--resume", "--max-seconds",
            "10", "--json")
    assert r.exit_code == 2
    msg = json.loads(r.stdout)["error"]["message"]
    assert "--max-seconds: was 3600, now 10" in msg and "DATA: was" in msg  # every difference named
    # the run in `out` was made on `data`; point it at the copy by resuming there with the same options
    state = json.loads((out / ".ttt-eval" / "state.json").read_text())
    state["config"]["DATA"] = str(work.resolve())
    (out / ".ttt-eval" / "state.json").write_text(json.dumps(state))
    clip(work / "s" / "b" / "1.wav", 0.5, 0.8)  # the audio of s/b changes
    state["docs"]["s/a"]["policies"]["document"]["sums"]["all"][0] += 1.0  # s/a's record is damaged
    (out / ".ttt-eval" / "state.json").write_text(json.dumps(state))
    r = cli("eval", "librilight", work, *BASE, "--codes-cache", cache, "--out", out, "--resume", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert any("s/b: its audio changed (s/b/1.wav); computed again" in w for w in res["warnings"])
    assert any("s/a: its resume record is damaged; computed again" in w for w in res["warnings"])
    fresh = cli("eval", "librilight", work, *BASE, "--codes-cache", cache, "--out", tmp_path / "fresh", "--json")
    assert nll(res) == pytest.approx(nll(json.loads(fresh.stdout)), rel=1e-9)
    assert nll(res) != pytest.approx(nll(ref), rel=1e-6)


def _interrupt(*a, **k):
    raise KeyboardInterrupt  # Ctrl-C


def test_interrupted_before_the_first_document_resumes(data, cache, reference, tmp_path, monkeypatch):
    import evals.librilight.scoring as scoring
    monkeypatch.setattr(scoring, "score_document", _interrupt)  # while the first document is scored
    out = tmp_path / "out"
    r = run(data, cache, out)
    assert r.exit_code == 130 and "Run the same command with --resume" in r.stderr
    assert json.loads((out / "results.json").read_text())["status"] == "interrupted"
    assert json.loads((out / ".ttt-eval" / "state.json").read_text())["done"] == []
    monkeypatch.undo()
    r = run(data, cache, out, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert nll(json.loads(r.stdout)) == pytest.approx(nll(reference[0]), rel=1e-9)


def test_ctrl_c_while_writing_results_keeps_finished_documents(data, cache, reference, tmp_path, monkeypatch):
    import evals.librilight.report as report
    real = report.write_curve_png
    monkeypatch.setattr(report, "write_curve_png", _interrupt)
    out = tmp_path / "out"
    r = run(data, cache, out, "--json")
    assert r.exit_code == 130
    obj = json.loads(r.stdout)
    assert obj["error"]["code"] == 130 and "--resume" in obj["error"]["message"]
    assert obj["documents_done"] == ["s/a", "s/b"] and no_temporaries(out)
    assert names(out) == {"results.json", "curve.csv", ".ttt-eval/", ".ttt-eval/state.json"}
    monkeypatch.setattr(report, "write_curve_png", real)
    r = run(data, cache, out, "--resume")
    assert r.exit_code == 0 and "resuming: 2 of 2" in r.stderr, r.output
    assert names(out) == {"results.json", "curve.csv", "curve.png", ".ttt-eval/", ".ttt-eval/state.json"}


def test_disk_full_keeps_finished_documents_for_resume(data, cache, tmp_path, monkeypatch):
    # 24 KiB: the resume record (~5 KB), results.json (~6 KB) and curve.csv fit, curve.png (~47 KB) does not
    with small_disk(tmp_path / "disk", 24, monkeypatch) as how:
        out = tmp_path / "disk" / "out"
        r = run(data, cache, out, "--json")
        left = names(tmp_path / "disk")
        state = json.loads((out / ".ttt-eval" / "state.json").read_text()) if left else None
    assert r.exit_code == 1, (how, r.output)
    obj = json.loads(r.stdout)
    msg = obj["error"]["message"]
    assert "No space left on device" in msg and "curve.png" in msg and "--resume" in msg
    assert "Traceback" not in r.output
    assert obj["documents_done"] == ["s/a", "s/b"] and obj["documents_not_run"] == []
    assert left == {"out/", "out/results.json", "out/curve.csv", "out/.ttt-eval/", "out/.ttt-eval/state.json"}, \
        (how, left)  # what was finished stays; no partial curve.png, no temporary
    assert state["done"] == ["s/a", "s/b"]


def test_non_utf8_names_in_the_dataset(tmp_path, cache):
    import os
    root = tmp_path / "data"
    clip(root / "s" / os.fsdecode(b"b\xe9") / os.fsdecode(b"\xff1.wav"), 0.0, 0.8)
    r = cli("eval", "librilight", root, *BASE, "--codes-cache", cache, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["documents"][0]["id"] == "s/b\ufffd" and res["documents"][0]["files"][0]["path"].endswith("1.wav")
    json.loads((tmp_path / "o" / "results.json").read_text(encoding="utf-8"))
