"""`ttt eval asr` end to end (SPEC §5.7), and `ttt infer` on files longer than --whole-file-seconds (SPEC §5.1).

References: the written hypotheses scored here with whisper's normaliser and jiwer directly (never the
protocol's numbers), sums and means by hand; the `off` transcription against a plain moshi LMGen loop
written here with kyutai's padding; step and reset counts by hand; the streamed `.wav` against
`sphn.write_wav` of the PCM that moshi's Mimi decodes from the generated tokens. Random weights: the
WERs are meaningless, the pipeline is real.
"""

import csv
import json
from pathlib import Path

import jiwer
import numpy as np
import pytest
import sphn
import torch
from whisper_normalizer.english import EnglishTextNormalizer

from bootstrap_reference import scipy_ci
from safety_helpers import cli, clip, float_wav
from ttt_cli import load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "asr"
HELLO = ROOT / "examples" / "hello.wav"
SR, FRAME = 24000, 1920
FILE_KEYS = {"path", "reference", "hypothesis", "wer", "cer", "substitutions", "deletions", "insertions", "words",
             "longest_deletion_run", "longest_gap_s", "repetition_rate", "bins"}
NORM = EnglishTextNormalizer()


def norm(text):
    return " ".join(NORM(text).split())


def frames_of(path, pads):
    """moshi.run_inference's reading (sphn.read at 24 kHz, channel mix), padded, as whole frames."""
    data, _ = sphn.read(str(path), sample_rate=SR)
    x = np.pad(np.asarray(data, np.float32).mean(0), (int(pads[0] * SR), int(pads[1] * SR)))
    return [x[i:i + FRAME] for i in range(0, len(x) - FRAME + 1, FRAME)]


def moshi_stt_text_ids(plain, path, pads):
    """Text ids of a plain moshi STT loop written here: Mimi streaming, first frame twice, greedy LMGen."""
    from moshi.models import LMGen
    gen = LMGen(plain.lm, use_sampling=False)
    ids = []
    with torch.no_grad(), plain.mimi.streaming(1), gen.streaming(1):
        for t, f in enumerate(frames_of(path, pads)):
            codes = plain.mimi.encode(torch.from_numpy(np.ascontiguousarray(f))[None, None])
            if t == 0:
                gen.step(codes)
            out = gen.step(codes)
            if out is not None:
                ids.append(int(out[0, 0, 0]))
    return ids


def text_of(m, ids):
    lm, tok = m.lm, m.tokenizer
    special = {lm.text_padding_token_id, lm.end_of_text_padding_id} | {
        i for i in range(tok.get_piece_size()) if tok.is_control(i)}
    return [i for i in ids if i not in special]


# -- the whole command on the bundled examples ----------------------------------------------------------------

MANIFEST = ROOT / "tests" / "data" / "asr" / "manifest.jsonl"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Two bundled recordings, listed in a JSONL manifest (library.wav first: manifest order is kept), with the
    bundled manifest's references."""
    import shutil
    root = tmp_path_factory.mktemp("asr")
    refs = {Path(e["audio"]).name: e["text"] for e in map(json.loads, MANIFEST.read_text().splitlines())}
    lines = []
    for name in ("library.wav", "launch.flac"):
        shutil.copy(EXAMPLES / name, root / name)
        lines.append(json.dumps({"audio": name, "text": refs[name], "speaker": "espeak-ng"}))
    (root / "set.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "out"
    r = cli("eval", "asr", root / "set.jsonl", "--model", "tiny-stt", "-p", "off", "-p", "every:2s",
            "--bin-seconds", "4", "--out", out, "--json")
    return r, out, refs


def test_results_match_metrics_recomputed_from_the_hypotheses(full):
    r, out, refs = full
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert json.loads(r.stdout) == {**res, "out": str(out), "files": [str(out / n) for n in
                                    ("results.json", "wer.csv", "wer.png")], "failed": [], "exit_code": 0}
    assert res["status"] == "complete" and res["kind"] == "asr" and res["model"]["id"] == "tiny-stt"
    proto = res["protocol"]
    # kyutai's padding: 1 s before, tiny-stt's audio delay (0.5 s) + 0.5 s after
    assert (proto["mode"], proto["pad_before_s"], proto["pad_after_s"], proto["text_delay_s"]) == ("stt", 1.0, 1.0, 0.5)
    import importlib.metadata as md
    assert (res["environment"]["jiwer"], res["environment"]["whisper_normalizer"]) == (
        md.version("jiwer"), md.version("whisper-normalizer"))
    assert res["dataset"]["kind"] == "manifest" and res["dataset"]["recordings"] == 2
    assert [f["path"] for f in res["policies"]["off"]["files"]] == ["library.wav", "launch.flac"]
    units = {}  # policy -> per recording (errors, words, per-file WER, [(errors, ref_words) per bin]), from jiwer here
    for name, pol in res["policies"].items():
        errors = words = 0
        units[name] = []
        for f, rec in zip(pol["files"], res["recordings"]):
            assert set(f) == FILE_KEYS
            hyp = json.loads((out / rec["hypotheses"][name]["json"]).read_text())
            assert (out / rec["hypotheses"][name]["txt"]).read_text() == hyp["text"] + "\n" == f["hypothesis"] + "\n"
            assert f["reference"] == refs[f["path"]]
            # S/D/I and words from jiwer on whisper-normalised text, here
            al = jiwer.process_words(norm(f["reference"]), norm(hyp["text"]))
            assert (f["substitutions"], f["deletions"], f["insertions"]) == (al.substitutions, al.deletions,
                                                                             al.insertions)
            assert f["words"] == al.hits + al.substitutions + al.deletions
            assert f["wer"] == pytest.approx((al.substitutions + al.deletions + al.insertions) / f["words"])
            ch = jiwer.process_characters(norm(f["reference"]), norm(hyp["text"]))
            assert f["cer"] == pytest.approx((ch.substitutions + ch.deletions + ch.insertions) /
                                             (ch.hits + ch.substitutions + ch.deletions))
            # bins of 4 s cover the recording; their errors and words add up to the file's
            assert len(f["bins"]) >= int(np.ceil(rec["seconds"] / 4))
            assert sum(b["errors"] for b in f["bins"]) == al.substitutions + al.deletions + al.insertions
            assert sum(b["ref_words"] for b in f["bins"]) == f["words"]
            errors += al.substitutions + al.deletions + al.insertions
            words += f["words"]
            units[name].append((al.substitutions + al.deletions + al.insertions, f["words"], f["wer"],
                                [(b["errors"], b["ref_words"]) for b in f["bins"]]))
            assert rec["scores"][name] == {"errors": units[name][-1][0], "words": f["words"], "bins": {
                "errors": [b["errors"] for b in f["bins"]], "ref_words": [b["ref_words"] for b in f["bins"]]}}
        assert pol["wer"] == pytest.approx(errors / words)                                   # corpus
        assert pol["wer_mean"] == pytest.approx(np.mean([f["wer"] for f in pol["files"]]))   # mean of files
        assert pol["substitutions"] == sum(f["substitutions"] for f in pol["files"])
        for k in ("longest_deletion_run", "longest_gap_s", "repetition_rate"):
            assert pol[k] == max(f[k] for f in pol["files"])
        for i, b in enumerate(pol["bins"]):
            assert b["errors"] == sum(f["bins"][i]["errors"] for f in pol["files"] if i < len(f["bins"]))
        t = pol["timing"]
        assert t["realtime_factor"] == pytest.approx(t["wall_seconds"] / t["audio_seconds"])
        assert t["audio_seconds"] == pytest.approx(sum(rec["seconds"] for rec in res["recordings"]))
    check_intervals(res, units)
    # wer.csv holds the policies' bins and their intervals; wer.png is a PNG
    with open(out / "wer.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["policy", "bin_start_s", "bin_end_s", "wer", "errors", "ref_words", "ci_low", "ci_high",
                       "vs_off", "vs_off_ci_low", "vs_off_ci_high"]
    assert [(r[0], int(r[4]), int(r[5])) for r in rows[1:]] == [
        (n, b["errors"], b["ref_words"]) for n, p in res["policies"].items() for b in p["bins"]]
    cell = lambda v: "" if v is None else f"{v:.6f}"
    assert [r[6:] for r in rows[1:]] == [
        [cell(x) for x in (*(b["ci"] or (None, None)), (b["vs_off"] or {}).get("diff"),
                           *((b["vs_off"] or {}).get("ci") or (None, None)))]
        for p in res["policies"].values() for b in p["bins"]]
    assert (out / "wer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_intervals(res, units):
    """The intervals against scipy called on the recordings' (errors, words) counted here with jiwer: corpus WER,
    mean of per-file WERs, each bin over the recordings that reach it (a recording with the bin under one
    policy only counts (0, 0) under the other in the paired difference)."""
    assert res["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95, "method": "percentile",
                                "unit": "recording", "units": 2}
    for name, pol in res["policies"].items():
        mine = units[name]
        assert pol["ci"] == pytest.approx(scipy_ci([(e, w) for e, w, _, _ in mine]), rel=1e-12)
        assert pol["wer_mean_ci"] == pytest.approx(scipy_ci([(x, 1) for _, _, x, _ in mine]), rel=1e-12)
        if name == "off":
            assert pol["vs_off"] is None
            continue
        off = units["off"]
        assert pol["vs_off"]["diff"] == pytest.approx(pol["wer"] - res["policies"]["off"]["wer"])
        assert pol["vs_off"]["ci"] == pytest.approx(scipy_ci([(e, w) for e, w, _, _ in mine],
                                                             [(e, w) for e, w, _, _ in off]), rel=1e-12)
        for i, b in enumerate(pol["bins"]):
            have = [k for k in range(len(mine)) if i < len(mine[k][3])]
            a = [mine[k][3][i] for k in have]
            assert b["ci"] == (pytest.approx(scipy_ci(a), rel=1e-12) if len(have) > 1 else None), (name, i)
            both = [k for k in range(len(mine)) if i < len(mine[k][3]) or i < len(off[k][3])]
            at = lambda u, k: u[k][3][i] if i < len(u[k][3]) else (0, 0)
            if len(both) > 1 and sum(at(off, k)[1] for k in both):
                assert b["vs_off"]["ci"] == pytest.approx(scipy_ci([at(mine, k) for k in both],
                                                                   [at(off, k) for k in both]), rel=1e-12)


def test_off_is_plain_moshi_and_every_resets_on_schedule(full):
    """`off` transcribes as a plain moshi STT loop with kyutai's padding; `every:2s` resets fast weights
    before steps 25, 50, ... of each stream (round(25.0)), so with tiny-stt's chunk of 16 each 25-step stretch
    applies one update, and a last stretch of 16 or more one more: counted by the layers' telemetry."""
    r, out, _ = full
    res = json.loads((out / "results.json").read_text())
    plain = load_model("tiny-stt", device="cpu", dtype="fp32", ttt=False)
    rec = next(x for x in res["recordings"] if x["key"] == "library.wav")
    hyp = json.loads((out / rec["hypotheses"]["off"]["json"]).read_text())
    ids = moshi_stt_text_ids(plain, EXAMPLES / "library.wav", (1.0, 1.0))
    # not two empty transcripts: tiny-stt's random weights emit text tokens on this recording
    assert len(text_of(plain, ids)) >= 10 and len(set(text_of(plain, ids))) >= 3
    assert [t["id"] for t in hyp["tokens"]] == text_of(plain, ids)
    assert hyp["text"] == plain.tokenizer.decode(text_of(plain, ids)).strip() and hyp["text"]
    # steps: the padded frames + the repeated first frame
    assert hyp["steps"] == len(frames_of(EXAMPLES / "library.wav", (1.0, 1.0))) + 1
    off, every = res["policies"]["off"], res["policies"]["every:2s"]
    assert off["ttt"]["on"] is False and every["ttt"]["reset_every_steps"] == 25
    assert set(off["telemetry"]) == set(every["telemetry"]) == {"1", "3"}  # tiny-stt's TTT layers
    assert all(t["updates"] == 0 for t in off["telemetry"].values())
    for layer, t in every["telemetry"].items():
        resets = updates = 0
        for rec in res["recordings"]:
            steps = json.loads((out / rec["hypotheses"]["every:2s"]["json"]).read_text())["steps"]
            resets += (steps - 1) // 25
            updates += steps // 25 + (steps % 25) // 16
        assert (t["resets"], t["updates"]) == (resets, updates) and resets > 0


def test_transcribe_mode_on_a_moshi_checkpoint(tmp_path):
    data = tmp_path / "data"
    clip(data / "a.wav", 0.5, 1.0)
    (data / "a.txt").write_text("Hello there.")
    r = cli("eval", "asr", data, "--model", "tiny", "-p", "document", "--out", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    p = res["protocol"]
    assert (p["mode"], p["pad_before_s"], p["pad_after_s"], p["text_delay_s"]) == ("transcribe", 1.0, 2.5, 2.0)
    hyp = json.loads((tmp_path / "out" / res["recordings"][0]["hypotheses"]["document"]["json"]).read_text())
    assert hyp["mode"] == "transcribe"
    assert hyp["steps"] == (SR + SR + int(2.5 * SR)) // FRAME  # no repeated first frame when forced
    assert res["policies"]["document"]["ttt"]["on"] is True
    assert res["policies"]["document"]["telemetry"]["1"]["updates"] > 0


# -- data safety: refusals, skipped inputs, resume --------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Three 1-second recordings with references, and one uninterrupted run over them (two policies)."""
    root = tmp_path_factory.mktemp("small")
    data = root / "data"
    for i, name in enumerate(("a", "b", "c")):
        clip(data / f"{name}.wav", 0.4 * i, 1.0)
        (data / f"{name}.txt").write_text(f"Recording {name}: hello there.")
    r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", "off", "-p", "document", "--out", root / "ref", "--json")
    assert r.exit_code == 0, r.output
    return data, root / "ref", json.loads(r.stdout)


def _stable(res):
    """What must not change between runs (timings and dates do)."""
    return {n: [{k: v for k, v in f.items()} for f in p["files"]] for n, p in res["policies"].items()}


def test_refusals_before_any_work(small, tmp_path):
    data, ref, _ = small
    for out, words in ((data / "out", "is inside the dataset"), (data, "is the dataset")):
        r = cli("eval", "asr", data, "--model", "tiny-stt", "--out", out, "--json")
        assert r.exit_code == 2 and json.loads(r.stdout)["error"]["code"] == 2, r.output
        assert words in r.stderr and "outside it" in r.stderr
    assert not (data / "out").exists()
    for pol, words in (("file", "is `document`"), ("never", "must not depend")):
        r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", pol, "--out", tmp_path / "x")
        assert r.exit_code == 2 and words in r.stderr, r.output
    r = cli("eval", "asr", data, "--model", "tiny-stt", "--mode", "dialog", "--out", tmp_path / "x")
    assert r.exit_code == 2
    r = cli("eval", "asr", data, "--model", "tiny", "--mode", "stt", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--mode stt is for speech-to-text checkpoints" in r.stderr
    # an earlier run's outputs: --resume or --overwrite, never silently replaced
    r = cli("eval", "asr", data, "--model", "tiny-stt", "--out", ref)
    assert r.exit_code == 2 and "--resume" in r.stderr and "--overwrite" in r.stderr
    foreign = tmp_path / "foreign"
    (foreign / "hyp" / "off").mkdir(parents=True)
    (foreign / "hyp" / "off" / "notes.txt").write_text("mine")
    r = cli("eval", "asr", data, "--model", "tiny-stt", "--out", foreign, "--overwrite")
    assert r.exit_code == 2 and "was not written by ttt" in r.stderr
    assert (foreign / "hyp" / "off" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_nemo_manifest_scores_like_the_directory(small, tmp_path):
    """The `small` recordings listed in a NeMo manifest (`audio_filepath`, `text`, `duration`; one duration
    wrong) give the directory run's hypotheses and WERs; the duration only warns."""
    data, ref, ref_res = small
    lines = []
    for i, name in enumerate(("a", "b", "c")):
        seconds = 1.0 if name != "b" else 7.5  # b's hint is wrong: reported, never used
        lines.append(json.dumps({"audio_filepath": str(data / f"{name}.wav"), "duration": seconds,
                                 "text": (data / f"{name}.txt").read_text()}))
    (tmp_path / "nemo.json").write_text("\n".join(lines) + "\n")
    r = cli("eval", "asr", tmp_path / "nemo.json", "--model", "tiny-stt", "-p", "off", "--out", tmp_path / "out",
            "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (res["dataset"]["kind"], res["dataset"]["manifest_format"]) == ("manifest", "nemo")
    assert ref_res["dataset"]["manifest_format"] is None
    assert [w for w in res["warnings"] if "manifest says 7.5 s" in w and "b.wav" in w]
    got, want = res["policies"]["off"], ref_res["policies"]["off"]
    assert [f["hypothesis"] for f in got["files"]] == [f["hypothesis"] for f in want["files"]]
    for k in ("wer", "wer_mean", "cer", "substitutions", "deletions", "insertions"):
        assert got[k] == pytest.approx(want[k]), k
    assert [rec["seconds"] for rec in res["recordings"]] == [rec["seconds"] for rec in ref_res["recordings"]]


def test_skipped_inputs_are_accounted_and_exit_1(small, tmp_path):
    data = tmp_path / "data"
    clip(data / "good.wav", 0.0, 1.0)
    (data / "good.txt").write_text("Hello.")
    clip(data / "noref.wav", 0.0, 1.0)                                           # no reference
    (data / "broken.wav").write_bytes(b"RIFF not audio at all")                  # undecodable
    (data / "broken.txt").write_text("broken")
    (data / "orphan.txt").write_text("no audio")                                 # reference alone
    clip(data / "ignored.wav", 0.0, 1.0)                                         # left out on purpose
    (data / "ignored.txt").write_text("ignore time segment in scoring")
    r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", "off", "--out", tmp_path / "out", "--json")
    assert r.exit_code == 1, r.output
    res = json.loads(r.stdout)
    assert res["error"]["code"] == 1 and res["exit_code"] == 1
    inputs = res["inputs"]
    assert inputs["done"] == ["good.wav"] and inputs["total"] == 5
    why = {s["path"]: (s["reason"], s["failed"]) for s in inputs["skipped"]}
    assert set(why) == {"noref.wav", "broken.wav", "orphan.txt", "ignored.wav"}
    assert "expected noref.txt" in why["noref.wav"][0] and why["noref.wav"][1]
    assert why["ignored.wav"][1] is False                                       # not a failure
    assert len(res["failed"]) == 3 and res["dataset"]["recordings"] == 1
    assert res["dataset"]["skipped"] == inputs["skipped"]


def test_interrupt_then_resume_equals_the_uninterrupted_run(small, tmp_path, monkeypatch):
    import ttt_cli.infer as inference
    data, _, want = small
    out = tmp_path / "out"
    real, calls = inference.infer, []

    def interrupted(*a, **k):  # Ctrl-C during the second recording's second policy
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(inference, "infer", interrupted)
    r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", "off", "-p", "document", "--out", out, "--json")
    monkeypatch.setattr(inference, "infer", real)
    assert r.exit_code == 130 and "--resume" in r.stderr, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and [x["key"] for x in res["recordings"]] == ["a.wav"]
    assert {s["path"]: s["reason"] for s in res["inputs"]["skipped"]} == {
        "b.wav": "not run: interrupted (Ctrl-C)", "c.wav": "not run: interrupted (Ctrl-C)"}
    # the recording in progress left nothing behind
    assert sorted(p.name for p in (out / "hyp" / "off").iterdir()) == ["a.wav.json", "a.wav.txt"]
    assert not any(".ttt-tmp-" in p.name for p in out.rglob("*"))
    # another configuration is refused, naming the option
    r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", "off", "-p", "document", "--out", out, "--resume",
            "--pad-before", "0.5")
    assert r.exit_code == 2 and "--pad-before: was 1, now 0.5" in r.stderr, r.output
    # --bin-seconds may differ: scores are recomputed from the hypotheses
    r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", "off", "-p", "document", "--out", out, "--resume",
            "--bin-seconds", "0.5")
    assert r.exit_code == 0, r.output
    got = json.loads((out / "results.json").read_text())
    assert got["protocol"]["bin_seconds"] == 0.5 and len(got["policies"]["off"]["files"][0]["bins"]) >= 2
    want = {**want, "policies": {n: {**p, "files": [{k: v for k, v in f.items() if k != "bins"} for f in p["files"]]}
                                 for n, p in want["policies"].items()}}
    got = {**got, "policies": {n: {**p, "files": [{k: v for k, v in f.items() if k != "bins"} for f in p["files"]]}
                               for n, p in got["policies"].items()}}
    assert _stable(got) == _stable(want) and got["status"] == "complete"
    for n, p in got["policies"].items():  # the same intervals as the uninterrupted run (bins differ: 0.5 s here)
        assert (p["ci"], p["wer_mean_ci"], p["vs_off"]) == (want["policies"][n]["ci"],
                                                            want["policies"][n]["wer_mean_ci"],
                                                            want["policies"][n]["vs_off"])
        assert p["ci"] is not None and (n == "off" or p["vs_off"]["ci"] is not None)
    assert "resuming: 1 of 3 recording(s) already done" in r.stderr
    # changed audio is transcribed again (said so); the others are kept
    clip(data / "c.wav", 0.1, 1.0)
    try:
        r = cli("eval", "asr", data, "--model", "tiny-stt", "-p", "off", "-p", "document", "--out", out, "--resume")
        assert r.exit_code == 0 and "c.wav: its audio changed; computed again" in r.stderr, r.output
        assert "transcribing 1 of 3 recording(s)" in r.stderr
    finally:
        clip(data / "c.wav", 0.8, 1.0)  # as the fixture wrote it


# -- ttt infer on files longer than --whole-file-seconds -------------------------------------------------------

def test_long_file_read_in_pieces_and_voice_written_as_produced(tiny, tmp_path, monkeypatch):
    """A 24 kHz file read in 0.5 s pieces (longer than --whole-file-seconds 2) gives exactly the whole-file run's
    outputs, and the .wav written as the run goes is sphn.write_wav of moshi's Mimi decoding of the tokens."""
    import ttt_cli.audio.frames as audio
    from ttt_cli.infer import InferOptions, infer

    wav = clip(tmp_path / "talk.wav", 0.0, 3.0)
    whole = infer(tiny, [wav], InferOptions(greedy=True)).results[0]
    assert whole.read_whole and whole.audio is not None
    monkeypatch.setattr(audio, "CHUNK_SECONDS", 0.5)
    r = cli("infer", wav, "--model", "tiny", "--greedy", "--whole-file-seconds", "2", "--out", tmp_path / "out",
            "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)["results"][0]
    assert obj["input"]["read"] == "pieces" and obj["steps"] == whole.steps
    assert [(t["step"], t["id"]) for t in obj["tokens"]] == [(t.step, t.id) for t in whole.tokens]
    assert obj["text"] == whole.text
    # the voice: Mimi decodes the generated tokens frame by frame, sphn writes them
    pcm = []
    with torch.no_grad(), tiny.mimi.streaming(1):
        for k in range(whole.audio_codes.shape[1]):
            codes = torch.from_numpy(whole.audio_codes[:, k:k + 1])[None]  # [1, dep_q, 1]
            pcm.append(tiny.mimi.decode(codes)[0, 0].numpy())
    sphn.write_wav(str(tmp_path / "ref.wav"), np.concatenate(pcm), SR)
    assert (tmp_path / "out" / "talk.wav").read_bytes() == (tmp_path / "ref.wav").read_bytes()
    assert not any(".ttt-tmp-" in p.name for p in (tmp_path / "out").iterdir())


def test_damage_found_part_way_through_a_long_file(tmp_path, monkeypatch):
    """Non-finite samples met while a long file is streamed: that file fails with the reason and leaves no
    output (its growing .wav is removed); the next file still runs."""
    import ttt_cli.audio.frames as audio
    monkeypatch.setattr(audio, "CHUNK_SECONDS", 0.5)
    x = np.asarray(sphn.read(str(HELLO), sample_rate=SR)[0], np.float32).mean(0)[:3 * SR].copy()
    x[int(2.5 * SR)] = np.nan
    float_wav(tmp_path / "bad.wav", x)
    good = clip(tmp_path / "good.wav", 0.0, 1.0)
    out = tmp_path / "out"
    r = cli("infer", tmp_path / "bad.wav", good, "--model", "tiny", "--greedy", "--whole-file-seconds", "1",
            "--out", out, "--json")
    assert r.exit_code == 1, r.output
    d = json.loads(r.stdout)
    assert d["inputs"]["done"] == [str(good)]
    assert "NaN" in d["inputs"]["skipped"][0]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.txt", "good.wav"]
