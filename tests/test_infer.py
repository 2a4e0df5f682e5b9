"""`ttt infer`: CLI in every mode, equality with a plain moshi LMGen loop, batching, bad inputs, outputs.

The presets' Mimi has untrained (all-zero) codebooks, so every input encodes to the same codes; the
tests run on copies of `tiny` / `tiny-stt` whose codebooks are fitted to latents of synthetic audio,
so that what a file contains reaches the LM and batching or channel bugs cannot hide.
"""

import copy
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from typer.testing import CliRunner

from ttt_cli import load_model
from ttt_cli.cli.app import app
from ttt_cli.inference import InferOptions, infer, plan_jobs, text_words

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HELLO = EXAMPLES / "hello.wav"
WEATHER = EXAMPLES / "weather.flac"
SR = 24000
FRAME = 1920
JSON_KEYS = {"input", "model", "mode", "text", "tokens", "words", "audio_out", "steps", "ms_per_step",
             "realtime_factor", "ttt", "sampling", "seed"}


# -- helpers ---------------------------------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(app, ["infer", *map(str, args)])


def read_mix(path):
    """24 kHz mono float32, read with sphn directly (independent of ttt_cli.audio)."""
    data, _ = sphn.read(str(path), sample_rate=SR)
    return np.asarray(data, dtype=np.float32).mean(axis=0)


def moshi_loop(m, wav, mode):
    """A plain moshi loop, written here: Mimi streaming encode, one LMGen.step per frame (greedy).

    dialog / stt follow moshi.run_inference (first frame fed twice, partial frame dropped, STT
    padding); transcribe forces the input on Moshi's stream (at step t codebook k = frame t - delay_k)
    with Mimi-encoded silence on the user stream.
    Returns (text ids, audio codes [dep_q, n] or None, decoded pcm or None).
    """
    from moshi.models import LMGen
    lm, mimi = m.lm, m.mimi
    if mode == "stt":
        cfg = m.info.stt_config
        wav = np.pad(wav, (int(cfg["audio_silence_prefix_seconds"] * SR),
                           int((cfg["audio_delay_seconds"] + 1.0) * SR)))
    frames = [wav[i:i + FRAME] for i in range(0, len(wav) - FRAME + 1, FRAME)]
    gen = LMGen(lm, use_sampling=False)
    silence = copy.deepcopy(mimi)
    dq = lm.dep_q
    texts, audio, pcm, hist = [], [], [], []
    with torch.no_grad(), mimi.streaming(1), silence.streaming(1), gen.streaming(1):
        for t, f in enumerate(frames):
            codes = mimi.encode(torch.from_numpy(np.ascontiguousarray(f))[None, None])
            if mode == "transcribe":
                user = silence.encode(torch.zeros(1, 1, FRAME))
                hist.append(codes[0, :dq, 0])
                rep = torch.tensor([[int(hist[t - d][k]) if t >= d else 0
                                     for k, d in enumerate(lm.delays[1:1 + dq])]])[..., None]
                out = gen.step(user, depformer_replace_tokens=rep)
            else:
                if t == 0:
                    gen.step(codes)
                out = gen.step(codes)
            if out is None:
                continue
            texts.append(int(out[0, 0, 0]))
            if dq:
                audio.append(out[0, 1:, 0].numpy())
            if mode == "dialog":
                pcm.append(mimi.decode(out[:, 1:])[0, 0].numpy())
    return (texts, np.stack(audio, 1) if audio else None, np.concatenate(pcm) if pcm else None)


@pytest.fixture(scope="module")
def plain():
    return load_model("tiny", device="cpu", dtype="fp32", ttt=False)


@pytest.fixture(scope="module")
def frozen():
    return load_model("tiny", device="cpu", dtype="fp32", ttt={"lr": 0})


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """2 s of hello.wav: a file of another length for batching."""
    p = tmp_path_factory.mktemp("clips") / "short.wav"
    sphn.write_wav(str(p), read_mix(HELLO)[: 2 * SR], SR)
    return p


def float_wav(path, samples):
    """A 32-bit float WAV written by hand (sphn writes int16, which cannot hold NaN)."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, SR, SR * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


# -- we are moshi plus TTT, nothing else -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dialog", "transcribe"])
def test_no_ttt_equals_plain_moshi_loop(plain, frozen, mode):
    ref_text, ref_audio, ref_pcm = moshi_loop(plain, read_mix(HELLO), mode)
    r = infer(frozen, [HELLO], InferOptions(mode=mode, greedy=True)).results[0]
    assert r.ok, r.error
    assert r.first_step == 0
    assert r.text_ids == ref_text
    assert np.array_equal(r.audio_codes, ref_audio)
    if mode == "dialog":
        assert r.audio.shape == ref_pcm.shape
        assert np.abs(r.audio - ref_pcm).max() <= 1e-5
        assert r.steps == HELLO_FRAMES + 1  # first frame fed twice
    else:
        assert r.audio is None and r.steps == HELLO_FRAMES


HELLO_FRAMES = 122582 // FRAME  # hello.wav: 122582 samples at 24 kHz


@pytest.mark.parametrize("path,channel", [(HELLO, None), (WEATHER, 0)])
def test_no_ttt_equals_moshi_run_inference(path, channel):
    """The reference peer itself: moshi.run_inference's InferenceState on the same checkpoint and file
    (it reads channel 0 of `sphn.read(path, sample_rate=24000)`; WEATHER is 16 kHz stereo)."""
    from moshi.run_inference import InferenceState
    peer = load_model("tiny", device="cpu", dtype="fp32", ttt=False)  # InferenceState streams it forever
    pcm, _ = sphn.read(str(path), sample_rate=SR)
    state = InferenceState(peer.info, peer.mimi, peer.tokenizer, peer.lm, 1, 1.0, "cpu",
                           **{**peer.info.lm_gen_config, "use_sampling": False})
    with torch.no_grad():  # as moshi.run_inference's main runs it
        (ref_text, ref_pcm), = state.run(torch.from_numpy(pcm[None, 0:1]))
    frozen = load_model("tiny", device="cpu", dtype="fp32", ttt={"lr": 0})
    r = infer(frozen, [path], InferOptions(mode="dialog", greedy=True, channel=channel)).results[0]
    assert r.ok, r.error
    assert r.text_ids == ref_text.tolist()
    assert r.audio.shape == ref_pcm[0].shape and np.abs(r.audio - ref_pcm[0].numpy()).max() <= 1e-5


def test_no_ttt_stt_equals_plain_moshi_loop():
    plain_stt = load_model("tiny-stt", device="cpu", dtype="fp32", ttt=False)
    frozen_stt = load_model("tiny-stt", device="cpu", dtype="fp32", ttt={"lr": 0})
    ref_text, _, _ = moshi_loop(plain_stt, read_mix(WEATHER), "stt")
    r = infer(frozen_stt, [WEATHER], InferOptions(greedy=True)).results[0]  # auto -> stt
    assert r.ok and r.mode == "stt"
    assert r.text_ids == ref_text
    assert r.audio_codes is None and r.audio is None
    padded = len(read_mix(WEATHER)) + int(0.5 * SR) + int(1.5 * SR)
    assert r.steps == padded // FRAME + 1


def test_cli_no_ttt_tokens_are_moshis(plain, tmp_path):
    ref_text, _, ref_pcm = moshi_loop(plain, read_mix(HELLO), "dialog")
    res = cli(HELLO, "--model", "tiny", "--out", tmp_path, "--no-ttt", "--greedy", "--json")
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)["results"][0]
    pad, epad = plain.lm.text_padding_token_id, plain.lm.end_of_text_padding_id
    want = [(s, i) for s, i in enumerate(ref_text) if i not in (pad, epad)]
    assert [(t["step"], t["id"]) for t in obj["tokens"]] == want
    assert all(math.isclose(t["time"], t["step"] / 12.5) for t in obj["tokens"])
    assert obj["ttt"]["enabled"] is False
    pcm, sr = sphn.read(obj["audio_out"])
    assert sr == SR and pcm.shape[-1] == ref_pcm.shape[0]
    assert np.abs(pcm[0] - ref_pcm).max() < 2e-4  # 16-bit wav


# -- batching --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dialog", "transcribe", "stt"])
def test_batch_gives_each_file_its_alone_result(tiny, tiny_stt, short_clip, mode):
    m = tiny_stt if mode == "stt" else tiny
    # 66, 25 and 63 frames with 2 slots: the short file's slot is refilled while the other runs on.
    files = [WEATHER, short_clip, HELLO]
    batch = infer(m, files, InferOptions(mode=mode, greedy=True, batch_size=2)).results
    assert batch[0].telemetry[1]["updates"] > 0  # TTT really ran
    for f, rb in zip(files, batch):
        ra = infer(m, [f], InferOptions(mode=mode, greedy=True)).results[0]
        assert rb.ok and ra.ok
        assert rb.text_ids == ra.text_ids, f
        assert rb.steps == ra.steps
        if m.lm.dep_q:
            assert np.array_equal(rb.audio_codes, ra.audio_codes), f
        for i in ra.telemetry:  # each stream has its own fast weights and counters
            a, b = dict(ra.telemetry[i]), dict(rb.telemetry[i])
            assert math.isclose(a.pop("relative_drift"), b.pop("relative_drift"), rel_tol=1e-5)
            assert a == b


def test_greedy_is_reproducible_and_ttt_changes_output(tmp_path):
    outs = []
    for name, extra in (("a", []), ("b", []), ("off", ["--no-ttt"])):
        res = cli(HELLO, "--model", "tiny", "--out", tmp_path / name, "--greedy", *extra)
        assert res.exit_code == 0, res.output
        outs.append(json.loads((tmp_path / name / "hello.json").read_text()))
    a, b, off = outs
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    assert (tmp_path / "a" / "hello.wav").read_bytes() == (tmp_path / "b" / "hello.wav").read_bytes()
    assert a["tokens"] != off["tokens"]
    assert (tmp_path / "a" / "hello.wav").read_bytes() != (tmp_path / "off" / "hello.wav").read_bytes()
    tel = a["ttt"]["telemetry"]
    # every layer saw all steps (frames + the repeated first) and updated once per full 16-step chunk
    assert set(tel) == {"1", "3"}
    assert all(t["tokens"] == HELLO_FRAMES + 1 and t["updates"] == (HELLO_FRAMES + 1) // 16 for t in tel.values())
    assert all(t["relative_drift"] == 0 for t in off["ttt"]["telemetry"].values())


def test_sampling_uses_seed(tmp_path):
    runs = []
    for name, seed in (("s1", 1), ("s1b", 1), ("s2", 2)):
        res = cli(HELLO, "--model", "tiny", "--out", tmp_path / name, "--seed", seed, "--json")
        assert res.exit_code == 0, res.output
        runs.append(json.loads(res.stdout)["results"][0])
    assert runs[0]["tokens"] == runs[1]["tokens"] and runs[0]["tokens"] != runs[2]["tokens"]
    assert runs[0]["sampling"] == {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 50,
                                   "top_k_text": 25}  # the preset's lm_gen_config
    assert runs[0]["seed"] == 1


# -- the CLI in every mode ---------------------------------------------------------------------------

def test_cli_dialog_two_files_as_batch(tmp_path):
    res = cli(HELLO, WEATHER, "--model", "tiny", "--out", tmp_path, "--batch-size", "2", "--greedy", "--json")
    assert res.exit_code == 0, res.output
    objs = json.loads(res.stdout)["results"]  # only JSON on stdout: one object, the results inside
    assert [o["input"]["path"] for o in objs] == [str(HELLO), str(WEATHER)]
    for o, stem in zip(objs, ("hello", "weather")):
        assert JSON_KEYS <= set(o)
        assert o["mode"] == "dialog" and o["model"]["id"] == "tiny"
        assert (tmp_path / f"{stem}.txt").read_text() == o["text"] + "\n"
        assert json.loads((tmp_path / f"{stem}.json").read_text()) == o
        assert o["audio_out"] == str(tmp_path / f"{stem}.wav")
        pcm, sr = sphn.read(o["audio_out"])
        assert sr == SR and pcm.shape[-1] == (o["steps"] - 1) * FRAME  # max delay 1: steps - 1 frames
        assert o["ttt"]["enabled"] and o["ttt"]["config"]["layers"] == [1, 3]
        assert o["steps"] == o["input"]["frames"] + 1 and o["ms_per_step"] > 0 and o["realtime_factor"] > 0
        assert o["batch_size"] == 2 and o["sampling"]["use_sampling"] is False
        for w in o["words"]:
            assert 0 <= w["start"] < w["end"]
    w = objs[1]["input"]
    assert (w["sample_rate"], w["channels"], w["channel"]) == (16000, 2, "mix")
    assert "file" in res.stderr and "hello" in res.stderr  # the summary table
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_cli_transcribe_and_channel(tmp_path):
    res = cli(WEATHER, "--model", "tiny", "--mode", "transcribe", "--out", tmp_path / "mix", "--greedy", "--json")
    assert res.exit_code == 0, res.output
    mix = json.loads(res.stdout)["results"][0]
    assert mix["mode"] == "transcribe" and mix["audio_out"] is None
    assert sorted(p.name for p in (tmp_path / "mix").iterdir()) == ["weather.json", "weather.txt"]
    assert mix["steps"] == mix["input"]["frames"]  # no double feed: the input is forced, not fed
    res = cli(WEATHER, "--model", "tiny", "--mode", "transcribe", "--out", tmp_path / "ch1", "--greedy",
              "--channel", "1", "--json")
    assert res.exit_code == 0, res.output
    ch1 = json.loads(res.stdout)["results"][0]
    assert ch1["input"]["channel"] == "1" and ch1["tokens"] != mix["tokens"]


def test_cli_stt_mode_and_auto(tmp_path):
    res = cli(HELLO, "--model", "tiny-stt", "--out", tmp_path, "--greedy", "--json")  # auto -> stt
    assert res.exit_code == 0, res.output
    o = json.loads(res.stdout)["results"][0]
    assert o["mode"] == "stt" and o["audio_out"] is None and o["model"]["model_type"] == "stt"
    frames = (122582 + 12000 + 36000) // FRAME
    assert o["steps"] == frames + 1
    # STT times are on the input's timeline: step / 12.5 - silence prefix - audio delay, floored at 0.
    for t in o["tokens"]:
        assert math.isclose(t["time"], round(max(0.0, t["step"] / 12.5 - 1.0), 4))
    assert (tmp_path / "hello.txt").exists() and not (tmp_path / "hello.wav").exists()


def test_wrong_mode_for_checkpoint_is_usage_error(tmp_path):
    res = cli(HELLO, "--model", "tiny", "--mode", "stt", "--out", tmp_path)
    assert res.exit_code == 2 and "dep_q" in res.output
    res = cli(HELLO, "--model", "tiny-stt", "--mode", "dialog", "--out", tmp_path)
    assert res.exit_code == 2 and "--mode stt" in res.output
    res = cli(HELLO, WEATHER, "--model", "tiny", "--reset-policy", "carry", "--batch-size", "2",
              "--out", tmp_path)
    assert res.exit_code == 2 and "batch-size 1" in res.output
    assert not any(tmp_path.iterdir())


def test_carry_plays_files_as_one_stream(tiny, tmp_path):
    alone = [infer(tiny, [f], InferOptions(greedy=True)).results[0] for f in (HELLO, WEATHER)]
    res = cli(HELLO, WEATHER, "--model", "tiny", "--out", tmp_path, "--greedy", "--reset-policy", "carry",
              "--save-state", tmp_path / "end.safetensors", "--json")
    assert res.exit_code == 0, res.output
    a, b = json.loads(res.stdout)["results"]
    ids_alone = [(t.step, t.id) for t in alone[0].tokens]
    # the first file sees what it sees alone, plus the outputs that arrive once the second begins
    assert [(t["step"], t["id"]) for t in a["tokens"]][:len(ids_alone)] == ids_alone
    assert a["stream"]["start_step"] == 0 and b["stream"]["start_step"] == alone[0].info.frames
    assert b["steps"] == alone[1].info.frames  # only the stream's first frame is fed twice
    assert [(t.step, t.id) for t in alone[1].tokens] != [(t["step"], t["id"]) for t in b["tokens"]]
    # fast weights carried: the second file's layers have seen both files' steps
    assert b["ttt"]["telemetry"]["1"]["tokens"] == a["steps"] + b["steps"]
    from ttt_cli.state import load_state
    s = load_state(tmp_path / "end.safetensors")
    assert s.meta["source_files"] == [str(HELLO), str(WEATHER)] and s.meta["reset_policy"] == "carry"
    assert s.meta["steps"] == a["steps"] + b["steps"]


def test_save_and_init_state(tmp_path):
    snap = tmp_path / "hello.safetensors"
    res = cli(HELLO, "--model", "tiny", "--out", tmp_path / "a", "--greedy", "--save-state", snap)
    assert res.exit_code == 0, res.output
    from ttt_cli.state import load_state
    s = load_state(snap)
    assert s.meta["source_files"] == [str(HELLO)] and s.meta["steps"] == HELLO_FRAMES + 1
    fresh = cli(WEATHER, "--model", "tiny", "--out", tmp_path / "b", "--greedy", "--json")
    warm = cli(WEATHER, "--model", "tiny", "--out", tmp_path / "c", "--greedy", "--json", "--init-state", snap)
    warm2 = cli(WEATHER, "--model", "tiny", "--out", tmp_path / "d", "--greedy", "--json", "--init-state", snap)
    assert fresh.exit_code == warm.exit_code == warm2.exit_code == 0, warm.output
    f, w, w2 = (json.loads(r.stdout)["results"][0] for r in (fresh, warm, warm2))
    assert w["tokens"] != f["tokens"] and w["tokens"] == w2["tokens"]
    assert w["ttt"]["init_state"] == str(snap)
    # several streams with --save-state write a directory of <stem>.end.safetensors
    res = cli(HELLO, WEATHER, "--model", "tiny", "--out", tmp_path / "e", "--save-state", tmp_path / "states")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["hello.end.safetensors",
                                                                     "weather.end.safetensors"]
    # a snapshot that does not fit the model: usage error, nothing written
    res = cli(WEATHER, "--model", "tiny", "--ttt-layers", "1", "--out", tmp_path / "f", "--init-state", snap)
    assert res.exit_code == 2 and "layer" in res.output
    assert not (tmp_path / "f" / "weather.json").exists()


# -- bad inputs and outputs --------------------------------------------------------------------------

def test_bad_inputs_are_reported_and_skipped(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.wav").write_text("this is not audio\n" * 50)
    (bad / "empty.wav").write_bytes(b"")
    (bad / "truncated.wav").write_bytes(HELLO.read_bytes()[:60])
    sphn.write_wav(str(bad / "tiny.wav"), np.zeros(1000, np.float32), SR)  # 42 ms < one frame
    x = read_mix(HELLO)[: SR]
    x[100] = np.nan
    float_wav(bad / "nan.wav", x)
    inputs = [bad / "missing.wav", bad, bad / "notes.wav", bad / "empty.wav", bad / "truncated.wav",
              bad / "tiny.wav", bad / "nan.wav", HELLO]
    res = cli(*inputs, "--model", "tiny", "--out", tmp_path / "out", "--greedy", "--batch-size", "3", "--json")
    assert res.exit_code == 1, res.output
    objs = json.loads(res.stdout)["results"]
    errors = {Path(o["input"]["path"]).name: o.get("error") for o in objs}
    assert "no such file" in errors["missing.wav"]
    assert "directory" in errors["bad"]
    assert "cannot decode" in errors["notes.wav"] or "0 samples" in errors["notes.wav"]
    assert "empty" in errors["empty.wav"]
    # 16 bytes of samples after the header: decoders read 8 samples or none
    assert any(r in errors["truncated.wav"] for r in ("0 samples", "cannot decode", "shorter than one"))
    assert "shorter than one" in errors["tiny.wav"]
    assert "NaN" in errors["nan.wav"]
    assert errors["hello.wav"] is None
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["hello.json", "hello.txt", "hello.wav"]
    assert "7 of 8 input(s) failed" in res.stderr and "FAILED" in res.stderr


def test_existing_outputs_are_not_overwritten(tmp_path):
    assert cli(HELLO, "--model", "tiny", "--out", tmp_path, "--greedy").exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = cli(HELLO, "--model", "tiny", "--out", tmp_path, "--greedy", "--no-ttt")
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    res = cli(HELLO, "--model", "tiny", "--out", tmp_path, "--greedy", "--no-ttt", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "hello.json").read_text())["ttt"]["enabled"] is False


def test_unwritable_outputs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli(HELLO, "--model", "tiny", "--out", blocker / "sub")
    assert res.exit_code == 2 and "cannot write to the output directory" in res.output
    # a directory in the way of one input's output: found before any work (SPEC §7.1), nothing written
    out = tmp_path / "out"
    (out / "hello.txt").mkdir(parents=True)
    res = cli(HELLO, WEATHER, "--model", "tiny", "--out", out, "--overwrite")
    assert res.exit_code == 2, res.output
    assert sorted(p.name for p in out.iterdir()) == ["hello.txt"]
    assert (out / "hello.txt").is_dir() and "is a directory" in res.stderr


def test_same_stem_twice(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(HELLO, tmp_path / d / "x.wav")
    jobs = plan_jobs([tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", HELLO])
    assert [j.stem for j in jobs] == ["a_x", "b_x", "hello"]
    res = cli(tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", "--model", "tiny", "--mode", "transcribe",
              "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x.json", "a_x.txt", "b_x.json", "b_x.txt"]


# -- word timestamps -----------------------------------------------------------------------------------

def test_stt_words_from_end_of_padding_tokens(tiny_stt):
    tok, lm = tiny_stt.tokenizer, tiny_stt.lm
    pad, epad = lm.text_padding_token_id, lm.end_of_text_padding_id
    the, room = tok.piece_to_id("▁the"), tok.piece_to_id("▁room")
    assert tok.id_to_piece(the) == "▁the" and tok.id_to_piece(room) == "▁room"
    #       step: 0    1     2    3    4     5     6    7    8
    ids = [pad, epad, the, pad, pad, epad, room, pad, pad]
    steps = list(range(len(ids)))
    # offset 0.1 s; 'the' from step 2 to the EPAD at 5; 'room' (no closing EPAD) ends at the
    # stream end (9 steps) since that is sooner than 1 s after its start.
    tokens, words = text_words(tiny_stt, steps, ids, offset=0.1, n_steps=9, stt=True)
    assert [(t.step, t.id) for t in tokens] == [(2, the), (6, room)]
    assert [(w.word, w.start_step, w.end_step) for w in words] == [("the", 2, 5), ("room", 6, 9)]
    assert [(w.start, w.end) for w in words] == [(round(2 / 12.5 - 0.1, 4), round(5 / 12.5 - 0.1, 4)),
                                                 (round(6 / 12.5 - 0.1, 4), round(9 / 12.5 - 0.1, 4))]
    # not STT: a word spans the steps its tokens were emitted at
    _, words = text_words(tiny_stt, steps, ids, offset=0.0, n_steps=9, stt=False)
    assert [(w.word, w.start, w.end) for w in words] == [("the", 0.16, 0.24), ("room", 0.48, 0.56)]
