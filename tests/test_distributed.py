"""Scale-out of `ttt eval librilight` (SPEC §5.6): real `torch.distributed.run` jobs of 2 CPU processes (gloo) on
the tiny preset, a rank killed and the run resumed, checked against a single-process run of the same command
(the reference), plus the share rule against a hand computation (any number of ranks)."""

import csv
import json
import shutil
import time

import librilight_data as LD
import pytest
from distributed_helpers import close, single, torchrun, untimed
from ttt_cli.distributed import DEFAULT_TIMEOUT, FAULT_ENV, RANKS_DIR, balance


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
        close(untimed(strip(a[k])), untimed(strip(b[k])), k)
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
