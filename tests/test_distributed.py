"""Scale-out (SPEC §5.6): real `torch.distributed.run` jobs of 2 CPU processes (gloo) on the tiny preset,
checked against a single-process run of the same command (the reference), plus the share rule against a
hand computation (any number of ranks)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import librilight_data as LD
from ttt_cli.cli.app import app
from ttt_cli.distributed import DEFAULT_TIMEOUT, FAULT_ENV, RANKS_DIR, balance

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
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


# -- the share rule ------------------------------------------------------------------------------

def test_balance_longest_first_by_hand():
    # weights a5 b1 c4 d2 e3 -> heaviest first: a->0 (0|0), c->1 (5|0), e->1 (5|4), d->0 (5|7), b: 7|7 tie -> 0
    items = [("a", 5), ("b", 1), ("c", 4), ("d", 2), ("e", 3)]
    assert balance(items, 2) == [["a", "b", "d"], ["c", "e"]]
    assert balance(items, 7) == [["a"], ["c"], ["e"], ["d"], ["b"], [], []]
    shares = balance([(str(i), (i * 7) % 5) for i in range(23)], 3)
    assert sorted(k for s in shares for k in s) == sorted(str(i) for i in range(23))  # each exactly once


# -- eval librilight: a rank killed, then --resume -------------------------------------------------

EVAL = ["-p", "document", "-p", "off", "--model", "tiny"]
# The test set plus a copy of speaker 20 as speaker 30: five documents, so that each rank has work both
# before and after the kill. Shares of 2 ranks by seconds, longest first: with book2 (three sentences) longer
# than 100/7 (two) longer than book10 (one), whatever espeak-ng's speed, rank 0 = 20/book2, 100/7 and
# rank 1 = 20/book10, 30/book2, 30/book10 (the fixture checks that order on the synthesized files).
ORDER = ["20/book2", "20/book10", "30/book2", "30/book10", "100/7"]


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")
    data = LD.build(root / "data")
    shutil.copytree(data / "20", data / "30")
    secs = {d: sum(LD.seconds(data, d)) for d in ("20/book2", "100/7", "20/book10")}
    assert secs["20/book2"] > secs["100/7"] > secs["20/book10"], secs  # what the shares below follow from
    ref = single("eval", "librilight", data, *EVAL, "--out", root / "ref", "--codes-cache", root / "cache-ref")
    out = root / "dist"
    t0 = time.monotonic()
    # Rank 1 leaves silently after its first document, as a process on a lost node: rank 0 must stop
    # within --dist-timeout, keeping every finished document. 5 s: a live rank beats every 0.6 s, so even a
    # process starved on a loaded machine is not taken for dead, and the wait stays short.
    killed = torchrun(2, "eval", "librilight", data, *EVAL, "--out", out, "--codes-cache", root / "cache",
                      "--dist-timeout", "5", env={FAULT_ENV: "1:1"})
    killed_s = time.monotonic() - t0
    # (rank, document) of every record kept
    ranks = sorted((p.parent.name, json.loads(p.read_text())["doc_id"]) for p in (out / RANKS_DIR).rglob("*.json"))
    resumed = torchrun(2, "eval", "librilight", data, *EVAL, "--out", out, "--codes-cache", root / "cache",
                       "--resume", "--json")
    return ref, killed, killed_s, ranks, resumed, root


def test_killed_rank_stops_the_others_within_the_timeout(eval_runs):
    ref, killed, killed_s, ranks, _, _ = eval_runs
    assert killed.returncode == 1, killed.stderr[-3000:]
    # bounded by --dist-timeout 5: the message names it, and the job ended long before the default timeout
    # would have (a job takes 10-40 s on 2 busy cores; waiting for the default alone takes DEFAULT_TIMEOUT)
    assert "rank 1 stopped answering: no sign of life for 5 s" in killed.stderr and "--resume" in killed.stderr
    assert killed_s < DEFAULT_TIMEOUT / 2, killed_s
    # Every finished document is kept as a record: rank 1's first document, and what rank 0 finished of its
    # share (two documents) before it stopped: how many depends on the machine's speed, not on the code.
    by_rank = [r for r, _ in ranks]
    assert by_rank.count("1") == 1 and by_rank.count("0") <= 2 and set(by_rank) <= {"0", "1"}, ranks


def test_resumed_two_process_run_equals_one_process(eval_runs):
    ref, _, _, ranks, resumed, root = eval_runs
    assert ref.exit_code == 1, ref.stderr  # the broken file of the test set: skipped, reported, exit 1
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout)
    a = json.loads((root / "ref" / "results.json").read_text())
    b = json.loads((root / "dist" / "results.json").read_text())
    assert out["policies"] == b["policies"] and out["out"] == str(root / "dist")  # rank 0's --json: the job's
    for k in ("policies", "documents", "dataset"):
        strip = (lambda d: {**d, "path": None}) if k == "dataset" else (lambda d: d)
        close(_untimed(strip(a[k])), _untimed(strip(b[k])), k)
    with open(root / "ref" / "curve.csv") as fa, open(root / "dist" / "curve.csv") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert len(ra) == len(rb) > 0
    num = lambda row: {k: v if k == "policy" else (float(v) if v else None) for k, v in row.items()}
    for x, y in zip(ra, rb):
        close(num(x), num(y), "curve.csv")
    assert b["policies"]["document"]["vs_off"]["ci"] is not None  # five documents: intervals, merged alike
    d = b["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo"
    # What the killed run had not finished, shared among both ranks (rank 1's record reaches rank 0's merge:
    # its document is not done again).
    kept = {doc for _, doc in ranks}
    assert sorted(sum(d["shares"].values(), [])) == sorted(set(ORDER) - kept) and set(d["shares"]) == {"0", "1"}
    assert a["distributed"] == {"world_size": 1, "backend": None, "shares": {"0": ORDER}}
    assert not (root / "dist" / RANKS_DIR).exists()  # merged completely: removed
    # Each rank's timeline (results.json timing.ranks, what `ttt bench` splits scale-out's wall time by): every
    # point, in the order a run reaches them; rank 0 alone merges. One process: one rank.
    assert set(b["timing"]["ranks"]) == {"0", "1"} and set(a["timing"]["ranks"]) == {"0"}
    for timeline in (*b["timing"]["ranks"].values(), a["timing"]["ranks"]["0"]):
        points = [p for p in TIMELINE if p in timeline]
        assert points == TIMELINE[:len(points)] and len(points) >= len(TIMELINE) - 1, timeline
        assert [timeline[p] for p in points] == sorted(timeline[p] for p in points), timeline
    assert "merged" in b["timing"]["ranks"]["0"] and "merged" not in b["timing"]["ranks"]["1"]


TIMELINE = ["process", "command", "torch_imported", "imported", "joined", "model_load_started", "model_loaded",
            "scoring_started", "scoring_done", "merged"]


def _untimed(d):
    """Drops wall-clock figures (they differ between runs); everything else must match."""
    if isinstance(d, dict):
        return {k: _untimed(v) for k, v in d.items()
                if k not in ("timing", "seconds_wall", "encode_seconds", "codes_cache_hit")}
    if isinstance(d, list):
        return [_untimed(v) for v in d]
    return d


# -- infer and export-state: whole files per rank ---------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two short clips (cut from the examples) and a file too short to hold one frame."""
    import sphn
    import numpy as np
    root = tmp_path_factory.mktemp("clips")
    paths = []
    for name, seconds in (("hello", 1.6), ("weather", 1.2)):
        src = EXAMPLES / ("hello.wav" if name == "hello" else "weather.flac")
        pcm, sr = sphn.read(str(src))
        sphn.write_wav(str(root / f"{name}.wav"), pcm[0, :int(seconds * sr)].astype(np.float32), sr)
        paths.append(root / f"{name}.wav")
    (root / "short.wav").write_bytes((root / "hello.wav").read_bytes()[:2000])
    return root, paths + [root / "short.wav"]


INFER = ["--model", "tiny", "--mode", "transcribe", "--greedy", "--json", "--format", "all", "--max-line-width", "16"]


def test_infer_two_processes_equal_one(clips):
    root, inputs = clips
    ref = single("infer", *inputs, *INFER, "--out", root / "i1")
    dist = torchrun(2, "infer", *inputs, *INFER, "--out", root / "i2")
    assert ref.exit_code == 1 and dist.returncode == 1, dist.stderr[-3000:]
    a, b = json.loads(ref.stdout), json.loads(dist.stdout)
    assert a["inputs"]["done"] == b["inputs"]["done"] and a["inputs"]["skipped"] == b["inputs"]["skipped"]
    assert len(b["inputs"]["done"]) == 2 and b["inputs"]["skipped"][0]["path"].endswith("short.wav")
    shares = b["results"][0]["distributed"]["shares"]
    assert sorted(x for s in shares.values() for x in s) == sorted(map(str, inputs))  # each file once
    assert all(shares.values())  # balanced: both ranks had work
    for x, y in zip(a["results"][:2], b["results"][:2]):
        for k in ("text", "tokens", "words", "steps", "mode", "ttt"):
            close(x[k], y[k], k)
        on_disk = json.loads(Path(y["outputs"]["json"]).read_text())
        assert on_disk["text"] == x["text"] and on_disk["distributed"] == y["distributed"]
        assert Path(y["outputs"]["txt"]).read_text() == Path(x["outputs"]["txt"]).read_text()
        for f in ("srt", "vtt", "tsv"):  # subtitles planned and written by each rank as by one process
            assert Path(y["outputs"][f]).parent == root / "i2"
            assert Path(y["outputs"][f]).read_text() == Path(x["outputs"][f]).read_text() != ""
    assert x["distributed"]["world_size"] == 1 and len(x["distributed"]["shares"]) == 1


# -- eval asr: runs begun by one process finished by two, and begun by two (a rank killed) finished by one ------

ASR = ["-p", "off", "-p", "document", "--model", "tiny-stt", "--bin-seconds", "0.5"]
# Shares of 2 ranks by seconds, longest first: all three -> rank 0 = a, rank 1 = b, c; b and c -> b, c.
CLIPS = {"a.wav": 1.2, "b.wav": 1.0, "c.wav": 0.8}


@pytest.fixture(scope="module")
def asr_ref(tmp_path_factory):
    """Three short recordings with references, and the one-process run over them (the reference)."""
    from safety_helpers import clip
    root = tmp_path_factory.mktemp("asr")
    data = root / "data"
    for i, (name, seconds) in enumerate(CLIPS.items()):
        clip(data / name, 0.3 * i, seconds)
        (data / name).with_suffix(".txt").write_text(f"Recording {name[0]}: hello there.")
    for pol in ("off", "document"):  # what another rank's output plan makes before the check's barrier
        (root / "ref" / "hyp" / pol).mkdir(parents=True)
    ref = single("eval", "asr", data, *ASR, "--out", root / "ref")
    assert ref.exit_code == 0, ref.output  # empty hypothesis folders are no earlier run
    return root, data


def test_eval_asr_begun_by_one_process_finished_by_two(asr_ref):
    import ttt_cli.infer as inference
    tmp_path, data = asr_ref
    # One process stops (Ctrl-C) in the second recording (a.wav committed), two processes finish.
    real, calls = inference.infer, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "infer", interrupted)
        part = single("eval", "asr", data, *ASR, "--out", tmp_path / "up")
    assert part.exit_code == 130, part.output
    up = torchrun(2, "eval", "asr", data, *ASR, "--out", tmp_path / "up", "--resume", "--json")
    assert up.returncode == 0, up.stderr[-3000:]
    b = _same_asr_outputs(tmp_path, "up")
    assert json.loads(up.stdout)["policies"] == b["policies"]  # rank 0's --json: the job's
    assert b["distributed"] == {"world_size": 2, "backend": "gloo", "shares": {"0": ["b.wav"], "1": ["c.wav"]}}


def test_eval_asr_rank_killed_then_finished_by_one_process(asr_ref):
    tmp_path, data = asr_ref
    # Rank 1 leaves silently after its first recording: rank 0 stops within --dist-timeout keeping both ranks'
    # records (a.wav; b.wav), and one process finishes the run (c.wav).
    killed = torchrun(2, "eval", "asr", data, *ASR, "--out", tmp_path / "down", "--dist-timeout", "5",
                      env={FAULT_ENV: "1:1"})
    assert killed.returncode == 1 and "rank 1 stopped answering: no sign of life for 5 s" in killed.stderr, \
        killed.stderr[-3000:]
    # rank 1's first recording is kept; rank 0's, when it finished it before stopping (the machine's speed)
    by_rank = sorted(p.parent.name for p in (tmp_path / "down" / RANKS_DIR).rglob("*.json"))
    assert by_rank in (["0", "1"], ["1"]), by_rank
    down = single("eval", "asr", data, *ASR, "--out", tmp_path / "down", "--resume")
    assert down.exit_code == 0 and f"resuming: {len(by_rank)} of 3 recording(s) already done" in down.stderr, \
        down.output
    assert _same_asr_outputs(tmp_path, "down")["distributed"]["world_size"] == 1


def _same_asr_outputs(root: Path, name: str) -> dict:
    """Asserts that run `name` wrote what the one-process run `ref` did (results.json up to timings and float
    summation order, wer.csv and the hypotheses' texts and words); returns its results.json."""
    a = json.loads((root / "ref" / "results.json").read_text())
    b = json.loads((root / name / "results.json").read_text())
    assert b["status"] == "complete"
    for k in ("policies", "recordings", "dataset", "inputs", "protocol", "model"):
        close(_untimed(a[k]), _untimed(b[k]), k)
    assert a["distributed"] == {"world_size": 1, "backend": None, "shares": {"0": list(CLIPS)}}
    assert (root / "ref" / "wer.csv").read_text() == (root / name / "wer.csv").read_text()
    hyps = sorted(p.relative_to(root / "ref") for p in (root / "ref" / "hyp").rglob("*.*"))
    assert hyps == sorted(p.relative_to(root / name) for p in (root / name / "hyp").rglob("*.*"))
    assert len(hyps) == 2 * 2 * len(CLIPS)
    for h in hyps:
        x, y = ((root / run / h).read_text().replace(str(root / run), "OUT") for run in ("ref", name))
        if h.suffix == ".json":  # the same words and tokens; timings differ between runs
            x, y = ({k: v for k, v in json.loads(t).items() if k not in ("ms_per_step", "realtime_factor")}
                    for t in (x, y))
        assert x == y, h
    assert not (root / name / RANKS_DIR).exists()  # merged completely: removed
    return b
