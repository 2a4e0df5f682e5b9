"""SPEC §7.1 through the real CLI on `tiny`: inputs are never written over, nothing half-written stays,
every input is accounted for, options mean what they say, `--json` always prints one object.

Every case asserts the exit code, the message and the exact set of files left behind; data-loss cases
compare checksums of the inputs before and after. Disk-full cases use small tmpfs mounts, read-only cases
a directory without write permission, obeyed by root too (see safety_helpers). Eval cases are in
test_safety_eval.py.
"""

import json
import os
import stat

import pytest
import torch

from safety_helpers import cli, clip, lying_wav, names, read_only_dir, small_disk, tree


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Three short clips in one input directory (dialog outputs would be <stem>.wav beside them)."""
    d = tmp_path_factory.mktemp("inputs")
    return [clip(d / "a.wav", 0.0, 0.5), clip(d / "b.wav", 1.5, 0.5), clip(d / "c.wav", 3.0, 0.5)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint written by `ttt init-checkpoint` (its own directory, for the init-checkpoint cases)."""
    root = tmp_path_factory.mktemp("ckpt")
    r = cli("init-checkpoint", "--preset", "tiny", "--out", root / "c", "--layers", "1")
    assert r.exit_code == 0, r.output
    return root / "c"


@pytest.fixture(scope="module")
def snapshot(audio, tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    r = cli("export-state", audio[0], "--model", "tiny", "--out", d / "s.safetensors")
    assert r.exit_code == 0, r.output
    return d / "s.safetensors"


def error_of(r) -> dict:
    """The one JSON object on stdout of a failed `--json` run."""
    obj = json.loads(r.stdout)
    assert isinstance(obj, dict) and set(obj["error"]) == {"code", "message", "hint"}, r.stdout
    assert obj["error"]["code"] == r.exit_code
    return obj


# -- inputs are read-only -------------------------------------------------------------------------

def test_infer_out_is_the_inputs_directory(audio):
    before = tree(audio[0].parent)
    r = cli("infer", *audio, "--model", "tiny", "--out", audio[0].parent, "--overwrite", "--json")
    assert r.exit_code == 2
    msg = error_of(r)["error"]["message"]
    assert "a.wav" in msg and "is an input audio file" in msg and "pass --overwrite" not in msg
    assert tree(audio[0].parent) == before  # not a byte changed, nothing added


def test_save_state_and_export_out_onto_an_input(audio, tmp_path):
    before = tree(audio[0].parent)
    r = cli("infer", audio[0], "--model", "tiny", "--out", tmp_path / "o", "--save-state", audio[0], "--overwrite")
    assert r.exit_code == 2 and "from --save-state) is an input audio file" in r.stderr
    r = cli("infer", audio[0], "--model", "tiny", "--out", tmp_path / "o", "--save-state", audio[1], "--overwrite")
    assert r.exit_code == 2 and "b.wav exists and was not written by ttt" in r.stderr  # not an input, not ours
    r = cli("infer", audio[0], audio[1], "--model", "tiny", "--out", tmp_path / "o",
            "--save-state", audio[0].parent, "--overwrite")  # a directory of <stem>.end.safetensors: fine...
    assert r.exit_code == 0, r.output  # ... beside the inputs, not over them
    for d in (audio[0], audio[1]):
        assert (audio[0].parent / f"{d.stem}.end.safetensors").is_file()
        (audio[0].parent / f"{d.stem}.end.safetensors").unlink()
    r = cli("export-state", audio[1], "--model", "tiny", "--out", audio[1], "--overwrite")
    assert r.exit_code == 2 and "is an input audio file" in r.stderr
    assert tree(audio[0].parent) == before
    assert names(tmp_path) == {"o/", "o/a.json", "o/a.txt", "o/a.wav", "o/b.json", "o/b.txt", "o/b.wav"}


def test_hard_link_and_symlink_to_an_input_are_the_input(audio, tmp_path):
    os.link(audio[0], tmp_path / "hard.safetensors")
    os.symlink(audio[0], tmp_path / "soft.safetensors")
    before = tree(audio[0].parent)
    for name in ("hard.safetensors", "soft.safetensors"):
        r = cli("export-state", audio[0], "--model", "tiny", "--out", tmp_path / name, "--overwrite")
        assert r.exit_code == 2 and "is an input audio file" in r.stderr, r.output
    assert tree(audio[0].parent) == before


def test_init_checkpoint_never_replaces_its_source(ckpt, tmp_path):
    before = tree(ckpt)
    for out, words in [(ckpt, "is the source checkpoint"), (ckpt / "sub", "is inside the source checkpoint"),
                       (ckpt.parent, "contains the source checkpoint")]:
        r = cli("init-checkpoint", "--from", ckpt, "--out", out, "--overwrite", "--json")
        assert r.exit_code == 2, r.output
        msg = error_of(r)["error"]["message"]
        assert words.split(" the")[0] in msg and "pass --overwrite" not in msg, msg
    assert tree(ckpt) == before and not (ckpt / "sub").exists()
    assert names(ckpt.parent) == {"c/"} | {f"c/{n}" for n in names(ckpt)}


def test_init_checkpoint_replaces_only_its_own_directories(ckpt, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    r = cli("init-checkpoint", "--preset", "tiny", "--out", foreign, "--overwrite")
    assert r.exit_code == 2 and "was not written by ttt" in r.stderr
    assert names(foreign) == {"notes.txt"} and (foreign / "notes.txt").read_text() == "precious"
    # a checkpoint of ours with a stranger inside is not ours any more
    own = tmp_path / "own"
    r = cli("init-checkpoint", "--preset", "tiny", "--out", own)
    assert r.exit_code == 0, r.output
    mode = stat.S_IMODE(own.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask, oct(mode)  # the user's umask, not mkdtemp's 0700
    first = tree(own)
    r = cli("init-checkpoint", "--preset", "tiny", "--out", own, "--layers", "1")
    assert r.exit_code == 2 and "pass --overwrite" in r.stderr and tree(own) == first
    r = cli("init-checkpoint", "--preset", "tiny", "--out", own, "--layers", "1", "--overwrite")
    assert r.exit_code == 0, r.output
    assert set(tree(own)) == set(first) and json.loads((own / "config.json").read_text())["ttt"]["layers"] == [1]
    (own / "diary.txt").write_text("mine")
    r = cli("init-checkpoint", "--preset", "tiny", "--out", own, "--overwrite")
    assert r.exit_code == 2 and "was not written by ttt" in r.stderr and (own / "diary.txt").exists()
    assert names(tmp_path) == {"mine/", "mine/notes.txt", "own/", "own/diary.txt"} | {f"own/{n}" for n in first}


def test_init_checkpoint_out_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("init-checkpoint", "--preset", "tiny", "--out", f, "--overwrite")
    assert r.exit_code == 2 and "is a file" in r.stderr and f.read_text() == "x"
    with read_only_dir(tmp_path / "ro") as ro:
        r = ro.cli("init-checkpoint", "--preset", "tiny", "--out", ro.path / "ckpt", "--json")
        assert r.exit_code == 2 and "Permission denied" in error_of(r)["error"]["message"], r.output
        assert "Traceback" not in r.output and names(ro.path) == set()
    assert names(tmp_path) == {"file", "ro/"}


def test_overwrite_never_replaces_a_file_ttt_did_not_write(audio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text('{"mine": true}\n')
    (out / "a.txt").write_text("my notes\n")
    before = tree(out)
    for extra in ([], ["--overwrite"]):
        r = cli("infer", audio[0], "--model", "tiny", "--out", out, "--mode", "transcribe", *extra)
        assert r.exit_code == 2 and "was not written by ttt" in r.stderr and "pass --overwrite" not in r.stderr
    assert tree(out) == before


def test_two_inputs_never_share_an_output(audio, tmp_path):
    a, b = tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"
    clip(a, 0, 0.3), clip(b, 1, 0.3), clip(tmp_path / "a_x.wav", 2, 0.3)
    r = cli("infer", a, b, tmp_path / "a_x.wav", "--model", "tiny", "--mode", "transcribe", "--out",
            tmp_path / "o", "--batch-size", "3", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [o["outputs"]["txt"].rsplit("/", 1)[1] for o in res["results"]] == ["a_x.txt", "b_x.txt", "a_x_2.txt"]
    assert names(tmp_path / "o") == {f"{s}.{e}" for s in ("a_x", "b_x", "a_x_2") for e in ("txt", "json")}
    assert res["inputs"]["done"] == [str(a), str(b), str(tmp_path / "a_x.wav")] and res["exit_code"] == 0
    # two outputs of one run at one path: refused before any work
    r = cli("infer", a, "--model", "tiny", "--out", tmp_path / "p", "--save-state", tmp_path / "p" / "x.json")
    assert r.exit_code == 2 and "the .json output of x.wav (--out) and a fast-weight snapshot (--save-state) " \
                                 "would both be written to" in r.stderr
    assert not (tmp_path / "p").exists()


# -- nothing half-written --------------------------------------------------------------------------

def test_infer_disk_full_keeps_finished_and_reports_the_rest(audio, tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 48, monkeypatch) as how:  # one input's .txt/.wav/.json fit (~30 KiB)
        out = tmp_path / "disk" / "o"
        r = cli("infer", *audio, "--model", "tiny", "--out", out, "--greedy", "--json")
        left = names(tmp_path / "disk")
    assert r.exit_code == 1, (how, r.output)
    obj = error_of(r)
    msg = obj["error"]["message"]
    assert "No space left on device" in msg and "not run" in msg and "Traceback" not in r.output
    acc = obj["inputs"]
    done = acc["done"]
    assert done == [str(a) for a in audio[:len(done)]] and len(done) < 3, (how, acc)
    failing, rest = acc["skipped"][0], acc["skipped"][1:]
    assert failing["path"] == str(audio[len(done)]) and "No space left" in failing["reason"]
    assert [s["path"] for s in rest] == [str(a) for a in audio[len(done) + 1:]]
    assert all(s["reason"].startswith("not run: the run stopped after a write failure") for s in rest)
    kept = {f"o/{os.path.basename(d)[:-4]}.{e}" for d in done for e in ("json", "txt", "wav")}
    assert left == ({"o/"} | kept if kept else set()), (how, left)  # the failing input's files removed
    assert done, f"{how}: size the disk so that one input fits"


def test_export_state_disk_full_leaves_no_temporaries(audio, tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk", 160, monkeypatch) as how:  # one snapshot fits (~105 KiB), not two
        r = cli("export-state", *audio, "--model", "tiny", "--out", tmp_path / "disk" / "s")
        left = names(tmp_path / "disk")
    assert r.exit_code == 1, (how, r.output)
    assert "No space left on device" in r.stderr and "1 input(s) not run" in r.stderr
    assert left == {"s/", "s/a.end.safetensors"}, (how, left)


def test_save_state_into_a_read_only_directory(audio, tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        r = ro.cli("infer", audio[0], audio[1], "--model", "tiny", "--out", tmp_path / "o", "--save-state", ro.path)
        assert r.exit_code == 2 and "--save-state" in r.stderr and "Permission denied" in r.stderr, r.output
    assert names(tmp_path) == {"ro/"}  # checked before any work: no .txt/.wav left, no empty --out made


def test_bench_out_is_checked_before_the_bench(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        r = ro.cli("bench", "--model", "tiny", "--out", ro.path / "b.json", "--json",
                   fail_if_called={"ttt_cli.bench.run_bench": "the bench ran before --out was checked"})
        assert r.exit_code == 2 and "Permission denied" in error_of(r)["error"]["message"], r.output
    (tmp_path / "b.json").write_text("{}")
    r = cli("bench", "--model", "tiny", "--out", tmp_path / "b.json", "--overwrite")
    assert r.exit_code == 2 and "was not written by ttt" in r.stderr


def test_ctrl_c_keeps_finished_outputs_and_says_what_to_run(audio, tmp_path, monkeypatch):
    import ttt_cli.infer.directory as inference
    real = inference.write_result
    calls = []

    def write_then_interrupt(res, run, *a, **k):
        calls.append(res.job.stem)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second input's outputs are written
        return real(res, run, *a, **k)
    monkeypatch.setattr(inference, "write_result", write_then_interrupt)
    r = cli("infer", *audio, "--model", "tiny", "--out", tmp_path / "o", "--mode", "transcribe", "--json")
    assert r.exit_code == 130
    obj = error_of(r)
    assert "1 file(s) finished" in obj["error"]["message"] and str(audio[1]) in obj["error"]["message"]
    assert obj["inputs"]["done"] == [str(audio[0])] and len(obj["inputs"]["skipped"]) == 2
    assert names(tmp_path / "o") == {"a.json", "a.txt"}


# -- every input accounted for ---------------------------------------------------------------------

def test_bad_inputs_among_good_ones_are_skipped_with_reasons(audio, tmp_path):
    os.symlink("loop2", tmp_path / "loop1.wav")
    os.symlink("loop1.wav", tmp_path / "loop2")
    os.mkfifo(tmp_path / "pipe.wav")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    odd = tmp_path / os.fsdecode(b"caf\xe9.wav")  # not UTF-8
    clip(odd, 0.2, 0.6)
    trunc = lying_wav(tmp_path / "trunc.wav", 0.6, claims=5.0)
    args = [tmp_path / "loop1.wav", tmp_path / "pipe.wav", tmp_path / "dangling.wav", tmp_path / "missing.wav",
            audio[0], odd, trunc]
    r = cli("infer", *args, "--model", "tiny", "--mode", "transcribe", "--batch-size", "3", "--out", tmp_path / "o",
            "--json")
    assert r.exit_code == 1, r.output
    res = json.loads(r.stdout)
    reasons = {os.path.basename(s["path"]): s["reason"] for s in res["inputs"]["skipped"]}
    assert "symbolic link loop" in reasons["loop1.wav"]
    assert "named pipe (FIFO)" in reasons["pipe.wav"]
    assert "broken symbolic link" in reasons["dangling.wav"]
    assert reasons["missing.wav"] == "no such file"
    assert len(res["inputs"]["done"]) == 3 and res["inputs"]["total"] == 7
    warn = [w for w in res["inputs"]["warnings"] if w["path"] == str(trunc)]
    assert len(warn) == 1 and "header declares 5.00 s but only 0.60 s decode" in warn[0]["warning"]
    assert r.stderr.count("header declares 5.00 s") == 1  # printed once, cleanly
    trunc_json = json.loads((tmp_path / "o" / "trunc.json").read_text())
    assert trunc_json["input"]["warnings"] == [warn[0]["warning"]]
    assert names(tmp_path / "o") == {f"{s}.{e}" for s in ("a", os.fsdecode(b"caf\xe9"), "trunc")
                                     for e in ("txt", "json")}  # the input's own bytes in the output names
    odd_json = json.loads((tmp_path / "o" / (os.fsdecode(b"caf\xe9") + ".json")).read_text(encoding="utf-8"))
    assert odd_json["input"]["path"].endswith("caf\ufffd.wav")


# -- options mean what they say; --json is one object ----------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], "--seed"),
    (["--model", ""], "--model"),
    (["--ttt-layers", ""], "--ttt-layers ''"),
    (["--ttt-layers", "every:2@9"], "selects no layer"),
    (["--ttt-layers", ","], "selects no layer"),
])
def test_usage_errors_are_json_objects(audio, tmp_path, args, words):
    r = cli("infer", audio[0], "--model", "tiny", *args, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 2, r.output
    assert words in error_of(r)["error"]["message"]
    assert not (tmp_path / "o").exists()


def test_messages_name_the_exact_flag(audio, snapshot, tmp_path):
    r = cli("infer", audio[1], "--model", "tiny", "--ttt-lr", "0.01", "--out", tmp_path / "o", "--init-state",
            snapshot, "--json")
    assert r.exit_code == 2 and "Pass --force-state" in error_of(r)["error"]["message"]
    r = cli("infer", audio[1], "--model", "tiny", "--ttt-lr", "0.01", "--out", tmp_path / "o", "--init-state",
            snapshot, "--force-state", "--mode", "transcribe")
    assert r.exit_code == 0, r.output
    # a snapshot of another model (other TTT layers) cannot be forced
    r = cli("infer", audio[1], "--model", "tiny", "--ttt-layers", "3", "--out", tmp_path / "p", "--init-state",
            snapshot, "--force-state")
    assert r.exit_code == 2 and "cannot be forced" in r.stderr and "layer set differs" in r.stderr
    assert names(tmp_path) == {"o/", "o/b.txt", "o/b.json"}


def test_warnings_are_printed_once_without_source_lines(audio, tmp_path):
    r = cli("infer", audio[0], "--model", "tiny", "--ttt-layers", "0,1", "--mode", "transcribe", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("lacks TTT tensors") == 1 and "warnings.warn" not in r.stderr
    assert "UserWarning" not in r.stderr


def test_snapshot_with_bad_metadata_or_tensors_is_refused_naming_them(snapshot, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(snapshot), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    def variant(name, meta_edit=None, tensor_edit=None):
        meta = json.loads(header["ttt_state"])
        t = {k: v.clone() for k, v in tensors.items()}
        if meta_edit:
            meta_edit(meta)
        if tensor_edit:
            tensor_edit(t)
        save_file(t, str(tmp_path / name), metadata={**header, "ttt_state": json.dumps(meta)})
        return tmp_path / name

    cases = [(variant("seconds.safetensors", lambda m: m.update(seconds="abc")), "`seconds`"),
             (variant("nan.safetensors", tensor_edit=lambda t: t["layers.1.w"].__setitem__((0, 0), float("nan"))),
              "layers.1.w holds NaN"),
             (variant("dtype.safetensors", tensor_edit=lambda t: t.update({"layers.1.w": t["layers.1.w"].double()})),
              "layers.1.w is torch.float64"),
             (variant("shape.safetensors", tensor_edit=lambda t: t.update(
                 {"layers.1.pending_z": torch.zeros(3, 5)})), "pending_z")]
    for path, words in cases:
        for cmd in (["inspect-state", path], ["diff-state", path, snapshot]):
            r = cli(*cmd, "--json")
            assert r.exit_code == 2 and words in error_of(r)["error"]["message"], (cmd, r.output)
            assert "Traceback" not in r.output


def test_more_refusals_before_any_work(audio, snapshot, tmp_path):
    """The next things a careless user tries; each is refused (exit 2) with nothing written or changed."""
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"mine": 1}')
    data = tmp_path / "data"
    clip(data / "s" / "b" / "1.wav", 0.0, 0.3)
    before = tree(tmp_path), tree(audio[0].parent), tree(snapshot.parent)
    cases = [
        (["infer", audio[0], "--out", audio[0]], "is a file; it must be a directory"),
        (["export-state", audio[0], audio[1], "--out", audio[2]], "--out must be a directory, but it is a file"),
        (["export-state", audio[0], "--init-state", snapshot, "--out", snapshot, "--overwrite"],
         "is the --init-state snapshot"),
        (["infer", audio[0], "--init-state", snapshot, "--save-state", snapshot, "--out", tmp_path / "o"],
         "is the --init-state snapshot"),
        (["eval", "librilight", data, "--out", foreign, "--overwrite"], "was not written by ttt"),
        (["eval", "librilight", data, "--out", audio[0]], "is a file"),
    ]
    for args, words in cases:
        r = cli(*args, "--model", "tiny", "--json")
        assert r.exit_code == 2, (args, r.output)
        msg = error_of(r)["error"]["message"]
        assert words in msg and "pass --overwrite" not in msg, (args, msg)
    os.mkfifo(tmp_path / "pipe.safetensors")
    r = cli("inspect-state", tmp_path / "pipe.safetensors")
    assert r.exit_code == 2 and "named pipe (FIFO)" in r.stderr
    (tmp_path / "pipe.safetensors").unlink()
    assert (tree(tmp_path), tree(audio[0].parent), tree(snapshot.parent)) == before


def test_atomic_writer_leaves_nothing_on_any_exit(tmp_path):
    from ttt_cli.io import as_os_error, atomic_write
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old")

    def partial_then(exc):
        def write(p):
            p.write_bytes(b"half")
            raise exc
        return write
    for exc, expect in [(KeyboardInterrupt(), KeyboardInterrupt),
                        (ValueError("write failed: No space left on device (os error 28)"), OSError),
                        (RuntimeError("something else"), RuntimeError)]:
        with pytest.raises(expect) as info:
            atomic_write(dest, partial_then(exc))
        assert names(tmp_path) == {"f.bin"} and dest.read_bytes() == b"old"  # no temporary, the old file intact
        if expect is OSError:
            assert info.value.errno == 28 and info.value.filename == str(dest)
    assert as_os_error(ValueError("not an I/O problem")) is None
