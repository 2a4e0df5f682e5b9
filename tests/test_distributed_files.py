"""Scale-out of the per-file commands (SPEC §5.6): `ttt infer` and `ttt eval asr` as real `torch.distributed.run`
jobs of 2 CPU processes (gloo) on the tiny presets, checked against a single-process run of the same command; eval
asr begun by one process and finished by two, and begun by two (a rank killed) and finished by one.

Its own file (not test_distributed.py's) so that pytest-xdist's --dist loadfile runs the two halves of the
scale-out tests on different workers."""

import json
from pathlib import Path

import pytest
from distributed_helpers import close, single, torchrun, untimed
from ttt_cli.distributed import FAULT_ENV, RANKS_DIR

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
        close(untimed(a[k]), untimed(b[k]), k)
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
