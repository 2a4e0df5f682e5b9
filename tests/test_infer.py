"""`ttt infer` against plain moshi loops written here: TTT off (moshi's modules) and TTT on (moshi's
modules with the fast weights updated by the naive per-token loop of tests/naive_ttt.py), in every
mode, batched, carried and warm-started; moshi.run_inference as the peer; the CLI's options and errors.

References are computed once per (model, inputs, mode) and shared (`reference`).
"""

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from naive_ttt import checkpoint_ttt, naive_ttt
from safety_helpers import float_wav
from ttt_cli import load_model
from ttt_cli.cli.app import app
from ttt_cli.infer import InferOptions, infer, plan_jobs, text_words
from ttt_cli.models.presets import preset_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SR = 24000
FRAME = 1920
HELLO_FRAMES = 37  # the `hello` clip: 3 s at 24 kHz mono (beyond the 32-step context, 2 chunks + pending)
SHORT_FRAMES = 17  # the `short` clip: 1.4 s (one chunk + 2 pending tokens with the double first frame)
JSON_KEYS = {"input", "model", "mode", "text", "tokens", "words", "audio_out", "steps", "ms_per_step",
             "realtime_factor", "ttt", "sampling", "seed"}


# -- helpers ---------------------------------------------------------------------------------------

def cli(*args):
    return CliRunner().invoke(app, ["infer", *map(str, args)])


def read_wav(path, channel=None):
    """24 kHz float32, read as moshi.run_inference reads it (sphn.read), mixed down or one channel."""
    data, _ = sphn.read(str(path), sample_rate=SR)
    data = np.asarray(data, dtype=np.float32)
    return data.mean(axis=0) if channel is None else data[channel]


def moshi_loop(m, wavs, mode, ttt=None, init=None):
    """A plain moshi loop, written here: Mimi streaming encode, one LMGen.step per frame (greedy).

    dialog / stt follow moshi.run_inference (first frame fed twice, partial frame dropped, STT
    padding); transcribe forces the input on Moshi's stream (at step t codebook k = frame t - delay_k)
    with Mimi-encoded silence on the user stream. Several wavs are one continuous stream (`carry`):
    each file's whole frames in order. `ttt` = (config section, tensors): the TTT layers' down
    projection becomes a fast weight updated by the naive per-token loop (tests/naive_ttt.py), started
    from `init` ({layer: (W, pending Z rows, pending X0 rows)}) when given.
    Returns {text: ids, audio: codes [dep_q, n] or None, pcm, state: {layer: NaiveStream}}.
    """
    from moshi.models import LMGen
    lm, mimi = m.lm, m.mimi
    frames = []
    for wav in wavs:
        if mode == "stt":
            cfg = m.info.stt_config
            wav = np.pad(wav, (int(cfg["audio_silence_prefix_seconds"] * SR),
                               int((cfg["audio_delay_seconds"] + 1.0) * SR)))
        frames += [wav[i:i + FRAME] for i in range(0, len(wav) - FRAME + 1, FRAME)]
    gen = LMGen(lm, use_sampling=False)
    silence = copy.deepcopy(mimi)
    dq = lm.dep_q
    texts, audio, pcm, hist = [], [], [], []
    ctx = naive_ttt(lm, *ttt) if ttt else _no_streams()
    with torch.no_grad(), ctx as streams, mimi.streaming(1), silence.streaming(1), gen.streaming(1):
        for i, st in streams.items():
            st.start(*init[i]) if init else st.start()
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
    return {"text": texts, "audio": np.stack(audio, 1) if audio else None,
            "pcm": np.concatenate(pcm) if pcm else None, "state": dict(streams)}


class _no_streams:
    def __enter__(self):
        return {}

    def __exit__(self, *a):
        return False


_REFS: dict = {}


def reference(plain, preset, files, mode, channel=None, ttt=True, init=None, key=None):
    """`moshi_loop` on `files` (read here with sphn), computed once per arguments and shared by the tests.

    `ttt`: the preset's TTT section and tensors, read from its files (never from ttt_cli's layers).
    """
    k = (preset, tuple(map(str, files)), mode, channel, ttt, key)
    if k not in _REFS:
        spec = checkpoint_ttt(preset_dir(preset)) if ttt else None
        _REFS[k] = moshi_loop(plain, [read_wav(f, channel) for f in files], mode, spec, init)
    return _REFS[k]


def special_ids(m):
    """Padding, end of padding and sentencepiece control ids (not text), from moshi / sentencepiece."""
    tok = m.tokenizer
    return {m.lm.text_padding_token_id, m.lm.end_of_text_padding_id} | {
        i for i in range(tok.get_piece_size()) if tok.is_control(i)}


def text_tokens(m, ids, start=0):
    """[(step, id)] of the text tokens among a stream's outputs (what the JSON's `tokens` holds)."""
    sp = special_ids(m)
    return [(s - start, i) for s, i in enumerate(ids) if i not in sp]


def json_tokens(obj):
    return [(t["step"], t["id"]) for t in obj["tokens"]]


def assert_state_equals_naive(snapshot_file, ref_state, rel=1e-4):
    """A snapshot's W and pending rows (read with safetensors) against the naive loop's final stream."""
    s = load_file(str(snapshot_file))
    for i, st in ref_state.items():
        w = s[f"layers.{i}.w"].double()
        assert (w - st.w).norm() <= rel * st.w.norm(), i
        assert (w - st.w0).norm() > 1e-2 * st.w0.norm()  # it moved: not a comparison of two W0s
        assert s[f"layers.{i}.pending_z"].shape[0] == len(st.zs) > 0
        for name, rows in (("pending_z", st.zs), ("pending_x0", st.xs)):
            got, want = s[f"layers.{i}.{name}"].double(), torch.stack(rows)
            assert (got - want).norm() <= rel * want.norm(), (i, name)


@pytest.fixture(scope="module")
def plain():
    """Plain moshi modules (TTT layers not attached): the references run on it."""
    return load_model("tiny", device="cpu", dtype="fp32", ttt=False)


@pytest.fixture(scope="module")
def plain_stt():
    return load_model("tiny-stt", device="cpu", dtype="fp32", ttt=False)


@pytest.fixture(scope="module")
def frozen():
    return load_model("tiny", device="cpu", dtype="fp32", ttt={"lr": 0})


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Short clips cut from the bundled examples (the CPU cost of every run is its number of steps):
    `hello.wav` 3 s of examples/hello.wav (24 kHz mono), `weather.wav` 2.6 s of examples/weather.flac
    (16 kHz stereo: resampling, mix-down, channels), `short.wav` 1.4 s (batch slot refills, plumbing)."""
    d = tmp_path_factory.mktemp("clips")
    hello, sr = sphn.read(str(EXAMPLES / "hello.wav"))
    weather, wsr = sphn.read(str(EXAMPLES / "weather.flac"))
    assert (sr, wsr, weather.shape[0]) == (SR, 16000, 2)
    cut = np.ascontiguousarray
    sphn.write_wav(str(d / "hello.wav"), cut(hello[:, : 3 * SR]), SR)
    sphn.write_wav(str(d / "weather.wav"), cut(weather[:, : int(2.6 * wsr)]), wsr)
    sphn.write_wav(str(d / "short.wav"), cut(hello[:, : int(1.4 * SR)]), SR)
    return {n: d / f"{n}.wav" for n in ("hello", "weather", "short")}


@pytest.fixture(scope="module")
def hello(clips):
    return clips["hello"]


@pytest.fixture(scope="module")
def weather(clips):
    return clips["weather"]


@pytest.fixture(scope="module")
def short_clip(clips):
    return clips["short"]


# -- TTT off: we are moshi, nothing else -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dialog", "transcribe"])
def test_no_ttt_equals_plain_moshi_loop(plain, frozen, mode, short_clip):
    ref = reference(plain, "tiny", [short_clip], mode, ttt=False)
    r = infer(frozen, [short_clip], InferOptions(mode=mode, greedy=True)).results[0]
    assert r.ok, r.error
    assert r.first_step == 0
    assert r.text_ids == ref["text"]
    assert np.array_equal(r.audio_codes, ref["audio"])
    if mode == "dialog":
        assert r.audio.shape == ref["pcm"].shape
        assert np.abs(r.audio - ref["pcm"]).max() <= 1e-5
        assert r.steps == SHORT_FRAMES + 1  # first frame fed twice
    else:
        assert r.audio is None and r.steps == SHORT_FRAMES


def test_no_ttt_equals_moshi_run_inference(frozen, weather):
    """The reference peer itself: moshi.run_inference's InferenceState on the same checkpoint and file
    (it reads channel 0 of `sphn.read(path, sample_rate=24000)`; `weather` is 16 kHz stereo, so moshi's
    resampling is reproduced too)."""
    from moshi.run_inference import InferenceState
    peer = load_model("tiny", device="cpu", dtype="fp32", ttt=False)  # InferenceState streams it forever
    pcm, _ = sphn.read(str(weather), sample_rate=SR)
    state = InferenceState(peer.info, peer.mimi, peer.tokenizer, peer.lm, 1, 1.0, "cpu",
                           **{**peer.info.lm_gen_config, "use_sampling": False})
    with torch.no_grad():  # as moshi.run_inference's main runs it
        (ref_text, ref_pcm), = state.run(torch.from_numpy(pcm[None, 0:1]))
    r = infer(frozen, [weather], InferOptions(mode="dialog", greedy=True, channel=0)).results[0]
    assert r.ok, r.error
    assert r.text_ids == ref_text.tolist()
    assert r.audio.shape == ref_pcm[0].shape and np.abs(r.audio - ref_pcm[0].numpy()).max() <= 1e-5


def test_no_ttt_stt_equals_plain_moshi_loop(plain_stt, short_clip):
    frozen_stt = load_model("tiny-stt", device="cpu", dtype="fp32", ttt={"lr": 0})
    ref = reference(plain_stt, "tiny-stt", [short_clip], "stt", ttt=False)
    r = infer(frozen_stt, [short_clip], InferOptions(greedy=True)).results[0]  # auto -> stt
    assert r.ok and r.mode == "stt"
    assert r.text_ids == ref["text"]
    assert r.audio_codes is None and r.audio is None
    padded = len(read_wav(short_clip)) + int(0.5 * SR) + int(1.5 * SR)
    assert r.steps == padded // FRAME + 1


def test_sampling_options_equal_moshi_run_inference(plain, frozen, short_clip):
    """Sampling (temperatures, top-k, seed) against moshi.run_inference's InferenceState seeded as its main does."""
    from moshi.run_inference import InferenceState, seed_all
    sampling = {"temp": 0.6, "temp_text": 0.5, "top_k": 20, "top_k_text": 10}
    peer = load_model("tiny", device="cpu", dtype="fp32", ttt=False)
    state = InferenceState(peer.info, peer.mimi, peer.tokenizer, peer.lm, 1, 1.0, "cpu", use_sampling=True,
                           **sampling)
    pcm, _ = sphn.read(str(short_clip), sample_rate=SR)
    seed_all(7)
    with torch.no_grad():
        (ref_text, ref_pcm), = state.run(torch.from_numpy(pcm[None, 0:1]))
    run = infer(frozen, [short_clip], InferOptions(greedy=False, seed=7, **sampling))
    r = run.results[0]
    assert run.sampling == {"use_sampling": True, **sampling} and run.seed == 7
    assert r.text_ids == ref_text.tolist()
    assert r.audio.shape == ref_pcm[0].shape and np.abs(r.audio - ref_pcm[0].numpy()).max() <= 1e-5
    greedy = reference(plain, "tiny", [short_clip], "dialog", ttt=False)
    other = infer(frozen, [short_clip], InferOptions(seed=8, **sampling)).results[0]
    assert r.text_ids != greedy["text"] and other.text_ids != r.text_ids  # sampling and the seed matter


def test_sampling_defaults_and_bad_values(tmp_path, short_clip):
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path / "a", "--no-ttt", "--json")
    assert res.exit_code == 0, res.output
    o = json.loads(res.stdout)["results"][0]  # the preset's lm_gen_config, sampling on, moshi.run_inference's seed
    assert o["sampling"] == {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 50, "top_k_text": 25}
    assert o["seed"] == 4242
    for opt, value in (("--temp", "-1"), ("--temp-text", "nan"), ("--top-k", "-3"), ("--top-k-text", "-1")):
        res = cli(short_clip, "--model", "tiny", "--out", tmp_path / "b", opt, value)
        assert res.exit_code == 2 and opt in res.output, (opt, res.output)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


# -- TTT on: against the naive per-token fast-weight loop inside plain moshi ----------------------------

@pytest.mark.parametrize("mode", ["dialog", "transcribe", "stt"])
def test_ttt_on_batch_equals_naive_reference(tiny, tiny_stt, plain, plain_stt, short_clip, mode, hello, weather):
    """32, 17 and 37 frames with 2 slots (dialog): the short file's slot is refilled (reset + exec masks) while
    the other runs on; each file must give exactly what the naive loop gives on it alone."""
    m, p, preset = (tiny_stt, plain_stt, "tiny-stt") if mode == "stt" else (tiny, plain, "tiny")
    # dialog: a slot refilled; the other modes: a slot that finishes while the other runs on (exec mask)
    files = [weather, short_clip, hello] if mode == "dialog" else [short_clip, hello]
    batch = infer(m, files, InferOptions(mode=mode, greedy=True, batch_size=2)).results
    for f, r in zip(files, batch):
        ref = reference(p, preset, [f], mode)
        assert r.ok, r.error
        assert r.text_ids == ref["text"], f
        if m.lm.dep_q:
            assert np.array_equal(r.audio_codes, ref["audio"]), f
        if mode == "dialog":
            assert np.abs(r.audio - ref["pcm"]).max() <= 1e-5
        for i, st in ref["state"].items():  # each stream has its own fast weights and counters
            tel = r.telemetry[i]
            assert (tel["tokens"], tel["updates"], tel["pending_tokens"]) == (st.tokens, st.updates, len(st.zs))
            drift = ((st.w - st.w0).norm() / st.w0.norm()).item()
            assert tel["relative_drift"] == pytest.approx(drift, rel=1e-4) and drift > 0.1
    off = reference(p, preset, [hello], mode, ttt=False)
    assert batch[-1].text_ids != off["text"]  # TTT changes the output: the comparison is not TTT-off twice


def test_cli_no_ttt_equals_plain_moshi_loop(plain, tmp_path, hello):
    """The CLI with --no-ttt equals the plain moshi loop and differs from TTT on (the naive reference, which
    the CLI's TTT-on runs equal in test_cli_dialog_two_files_as_batch)."""
    off = cli(hello, "--model", "tiny", "--out", tmp_path, "--no-ttt", "--greedy", "--json")
    assert off.exit_code == 0, off.output
    b = json.loads(off.stdout)["results"][0]
    ref_off = reference(plain, "tiny", [hello], "dialog", ttt=False)
    assert json_tokens(b) == text_tokens(plain, ref_off["text"])
    assert json_tokens(b) != text_tokens(plain, reference(plain, "tiny", [hello], "dialog")["text"])
    assert all(math.isclose(t["time"], t["step"] / 12.5) for t in b["tokens"])
    pcm, sr = sphn.read(b["audio_out"])
    assert sr == SR and pcm.shape[-1] == ref_off["pcm"].shape[0]
    assert np.abs(pcm[0] - ref_off["pcm"]).max() < 2e-4  # 16-bit wav
    assert b["ttt"]["enabled"] is False
    assert all(t["relative_drift"] == 0 and t["updates"] == 0 for t in b["ttt"]["telemetry"].values())


def test_carry_equals_naive_reference(plain, tmp_path, short_clip, weather):
    """carry: the files are one stream (one double first frame); tokens and the end state against the naive loop."""
    end = tmp_path / "end.safetensors"
    res = cli(short_clip, weather, "--model", "tiny", "--out", tmp_path, "--greedy", "--reset-policy", "carry",
              "--save-state", end, "--json")
    assert res.exit_code == 0, res.output
    a, b = json.loads(res.stdout)["results"]
    ref = reference(plain, "tiny", [short_clip, weather], "dialog")
    got = [(t["step"] + o["stream"]["start_step"], t["id"]) for o in (a, b) for t in o["tokens"]]
    assert got == text_tokens(plain, ref["text"])
    pcm_a, pcm_b = (sphn.read(o["audio_out"])[0][0] for o in (a, b))
    pcm = np.concatenate([pcm_a, pcm_b])
    assert pcm.shape == ref["pcm"].shape and np.abs(pcm - ref["pcm"]).max() < 2e-4  # 16-bit wavs
    assert a["stream"]["start_step"] == 0 and b["stream"]["start_step"] == SHORT_FRAMES
    assert a["steps"] == SHORT_FRAMES + 1 and b["steps"] == len(read_wav(weather)) // FRAME
    assert b["ttt"]["telemetry"]["1"]["tokens"] == a["steps"] + b["steps"] == ref["state"][1].tokens
    assert_state_equals_naive(end, ref["state"])
    from ttt_cli.state import load_state
    s = load_state(end)
    assert s.meta["source_files"] == [str(short_clip), str(weather)] and s.meta["reset_policy"] == "carry"
    assert s.meta["steps"] == a["steps"] + b["steps"]
    alone = reference(plain, "tiny", [weather], "dialog")
    n = min(pcm_b.shape[0], alone["pcm"].shape[0])
    assert np.abs(pcm_b[:n] - alone["pcm"][:n]).max() > 1e-2  # carrying really changed the second file


def test_save_state_then_init_state_equal_naive_reference(plain, short_clip, tmp_path, weather):
    """--save-state writes the naive loop's end state (W and a 2-token pending chunk); --init-state
    continues from it, pending chunk included (SPEC §5.0), exactly as the naive loop does."""
    snap = tmp_path / "short.safetensors"
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path / "a", "--greedy", "--save-state", snap)
    assert res.exit_code == 0, res.output
    first = reference(plain, "tiny", [short_clip], "dialog")
    assert len(first["state"][1].zs) == 2  # 18 steps: one chunk + 2 pending tokens
    assert_state_equals_naive(snap, first["state"])
    from ttt_cli.state import load_state
    s = load_state(snap)
    assert s.meta["source_files"] == [str(short_clip)] and s.meta["steps"] == 18
    init = {i: (st.w, st.zs, st.xs) for i, st in first["state"].items()}
    warm_ref = reference(plain, "tiny", [weather], "dialog", init=init, key="after-short")
    no_pending = reference(plain, "tiny", [weather], "dialog", key="after-short-w-only",
                           init={i: (st.w, None, None) for i, st in first["state"].items()})
    cold = reference(plain, "tiny", [weather], "dialog")
    end = tmp_path / "end.safetensors"
    res = cli(weather, "--model", "tiny", "--out", tmp_path / "c", "--greedy", "--json", "--init-state", snap,
              "--save-state", end)
    assert res.exit_code == 0, res.output
    w = json.loads(res.stdout)["results"][0]
    assert json_tokens(w) == text_tokens(plain, warm_ref["text"])
    pcm = sphn.read(w["audio_out"])[0][0]
    assert np.abs(pcm - warm_ref["pcm"]).max() < 2e-4  # Moshi's voice too (16-bit wav)
    assert_state_equals_naive(end, warm_ref["state"])
    # the warm W and the pending chunk both matter: without them the stream goes elsewhere
    for other in (cold, no_pending):
        assert not np.array_equal(other["audio"], warm_ref["audio"])
        for i, st in warm_ref["state"].items():
            assert (st.w - other["state"][i].w).norm() > 1e-3 * st.w.norm()
    assert w["ttt"]["init_state"] == str(snap)


def test_save_state_several_streams_and_misfit(tmp_path, short_clip, weather):
    # several streams with --save-state write a directory of <stem>.end.safetensors
    res = cli(short_clip, weather, "--model", "tiny", "--mode", "transcribe", "--out", tmp_path / "e",
              "--save-state", tmp_path / "states")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["short.end.safetensors",
                                                                     "weather.end.safetensors"]
    # a snapshot that does not fit the model: usage error, nothing written
    res = cli(weather, "--model", "tiny", "--ttt-layers", "1", "--out", tmp_path / "f", "--init-state",
              tmp_path / "states" / "short.end.safetensors")
    assert res.exit_code == 2 and "layer set differs" in res.output
    assert not (tmp_path / "f" / "weather.json").exists()


# -- the CLI in every mode ---------------------------------------------------------------------------

def test_cli_dialog_two_files_as_batch(plain, tmp_path, hello, weather):
    res = cli(hello, weather, "--model", "tiny", "--out", tmp_path, "--batch-size", "2", "--greedy", "--json")
    assert res.exit_code == 0, res.output
    objs = json.loads(res.stdout)["results"]  # only JSON on stdout: one object, the results inside
    assert [o["input"]["path"] for o in objs] == [str(hello), str(weather)]
    for o, f, stem in zip(objs, (hello, weather), ("hello", "weather")):
        ref = reference(plain, "tiny", [f], "dialog")
        assert json_tokens(o) == text_tokens(plain, ref["text"])
        assert np.abs(sphn.read(o["audio_out"])[0][0] - ref["pcm"]).max() < 2e-4
        assert JSON_KEYS <= set(o)
        assert o["mode"] == "dialog" and o["model"]["id"] == "tiny"
        assert (tmp_path / f"{stem}.txt").read_text() == o["text"] + "\n"
        assert json.loads((tmp_path / f"{stem}.json").read_text()) == o
        assert o["audio_out"] == str(tmp_path / f"{stem}.wav")
        pcm, sr = sphn.read(o["audio_out"])
        assert sr == SR and pcm.shape[-1] == (o["steps"] - 1) * FRAME  # max delay 1: steps - 1 frames
        assert o["ttt"]["enabled"] and o["ttt"]["config"]["layers"] == [1, 3]
        tel = o["ttt"]["telemetry"]  # every layer saw every step and updated once per full 16-step chunk
        assert set(tel) == {"1", "3"} and all(t["tokens"] == o["steps"] and t["updates"] == o["steps"] // 16
                                             and t["pending_tokens"] == o["steps"] % 16 for t in tel.values())
        assert o["steps"] == o["input"]["frames"] + 1 and o["ms_per_step"] > 0 and o["realtime_factor"] > 0
        assert o["batch_size"] == 2 and o["sampling"]["use_sampling"] is False
        for w in o["words"]:
            assert 0 <= w["start"] < w["end"]
    w = objs[1]["input"]
    assert (w["sample_rate"], w["channels"], w["channel"]) == (16000, 2, "mix")
    assert "file" in res.stderr and "hello" in res.stderr  # the summary table
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_cli_transcribe_channel(plain, tmp_path, weather):
    """--channel 1 transcribes exactly the second channel (the naive reference on channel 1 of the file)."""
    res = cli(weather, "--model", "tiny", "--mode", "transcribe", "--out", tmp_path, "--greedy",
              "--channel", "1", "--json")
    assert res.exit_code == 0, res.output
    o = json.loads(res.stdout)["results"][0]
    assert o["mode"] == "transcribe" and o["audio_out"] is None and o["input"]["channel"] == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weather.json", "weather.txt"]
    assert o["steps"] == o["input"]["frames"]  # no double feed: the input is forced, not fed
    ch = {c: text_tokens(plain, reference(plain, "tiny", [weather], "transcribe", channel=c)["text"]) for c in (0, 1)}
    assert json_tokens(o) == ch[1]
    assert ch[1] != ch[0]  # the channels transcribe differently: reading the wrong one would show
    res = cli(weather, "--model", "tiny", "--out", tmp_path / "x", "--channel", "2")
    assert res.exit_code == 1 and "--channel 2 does not exist" in res.output


def test_cli_stt_mode_and_auto(plain_stt, tmp_path, hello):
    res = cli(hello, "--model", "tiny-stt", "--out", tmp_path, "--greedy", "--json")  # auto -> stt
    assert res.exit_code == 0, res.output
    o = json.loads(res.stdout)["results"][0]
    assert o["mode"] == "stt" and o["audio_out"] is None and o["model"]["model_type"] == "stt"
    ref = reference(plain_stt, "tiny-stt", [hello], "stt")
    assert [t["id"] for t in o["tokens"]] == [i for _, i in text_tokens(plain_stt, ref["text"])]
    frames = (3 * SR + 12000 + 36000) // FRAME
    assert o["steps"] == frames + 1
    # STT times are on the input's timeline: step / 12.5 - silence prefix - audio delay, floored at 0.
    for t in o["tokens"]:
        assert math.isclose(t["time"], round(max(0.0, t["step"] / 12.5 - 1.0), 4))
    assert (tmp_path / "hello.txt").exists() and not (tmp_path / "hello.wav").exists()


def test_usage_errors(tmp_path, short_clip, monkeypatch, weather):
    res = cli(short_clip, "--model", "tiny", "--mode", "stt", "--out", tmp_path)
    assert res.exit_code == 2 and "dep_q" in res.output
    res = cli(short_clip, "--model", "tiny-stt", "--mode", "dialog", "--out", tmp_path)
    assert res.exit_code == 2 and "--mode stt" in res.output
    res = cli(short_clip, weather, "--model", "tiny", "--reset-policy", "carry", "--batch-size", "2",
              "--out", tmp_path)
    assert res.exit_code == 2 and "batch-size 1" in res.output
    for bad in (["--batch-size", "0"], ["--channel", "-1"], ["--ttt-layers", "7"], ["--ttt-chunk-size", "0"],
                ["--ttt-lr", "-1"], ["--model", str(tmp_path / "nowhere")]):
        res = cli(short_clip, "--model", "tiny", "--out", tmp_path, *bad)
        assert res.exit_code == 2 and "Traceback" not in res.output, (bad, res.output)
    # --device cuda where there is no GPU: a clear usage error (simulated where one exists)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path, "--device", "cuda")
    assert res.exit_code == 2 and "no CUDA device" in res.output and "--device cpu" in res.output
    assert not any(tmp_path.iterdir())


def test_memory_estimate_refuses_and_force_overrides(tmp_path, short_clip, monkeypatch):
    """A run whose fast-weight estimate exceeds free memory is refused with the arithmetic; --force runs it."""
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real(name))
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path / "a", "--batch-size", "2", "--greedy")
    assert res.exit_code == 2, res.output
    assert "fast-weight memory" in res.output and "x 1 stream(s)" in res.output and "--force" in res.output
    assert not (tmp_path / "a" / "short.json").exists()
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path / "b", "--greedy", "--force")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "short.json").exists()


# -- bad inputs and outputs --------------------------------------------------------------------------

def test_bad_inputs_are_reported_and_skipped(tmp_path, short_clip, hello):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.wav").write_text("this is not audio\n" * 50)
    (bad / "empty.wav").write_bytes(b"")
    (bad / "truncated.wav").write_bytes(hello.read_bytes()[:60])
    sphn.write_wav(str(bad / "tiny.wav"), np.zeros(1000, np.float32), SR)  # 42 ms < one frame
    x = read_wav(hello)[: SR]
    x[100] = np.nan
    float_wav(bad / "nan.wav", x)
    inputs = [bad / "missing.wav", bad, bad / "notes.wav", bad / "empty.wav", bad / "truncated.wav",
              bad / "tiny.wav", bad / "nan.wav", short_clip]
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
    assert errors["short.wav"] is None
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["short.json", "short.txt", "short.wav"]
    assert "7 of 8 input(s) failed" in res.stderr and "FAILED" in res.stderr


def test_existing_outputs_are_not_overwritten(tmp_path, short_clip):
    assert cli(short_clip, "--model", "tiny", "--out", tmp_path, "--greedy").exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path, "--greedy", "--no-ttt")
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    res = cli(short_clip, "--model", "tiny", "--out", tmp_path, "--greedy", "--no-ttt", "--overwrite")
    assert res.exit_code == 0, res.output
    after = json.loads((tmp_path / "short.json").read_text())
    assert after["ttt"]["enabled"] is False and (tmp_path / "short.wav").read_bytes() != before["short.wav"]


def test_unwritable_outputs(tmp_path, short_clip, hello):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli(short_clip, "--model", "tiny", "--out", blocker / "sub")
    assert res.exit_code == 2 and "cannot write to the output directory" in res.output
    # a directory in the way of one input's output: found before any work (SPEC §7.1), nothing written
    out = tmp_path / "out"
    (out / "hello.txt").mkdir(parents=True)
    res = cli(hello, short_clip, "--model", "tiny", "--mode", "transcribe", "--out", out, "--overwrite")
    assert res.exit_code == 2, res.output
    assert sorted(p.name for p in out.iterdir()) == ["hello.txt"]
    assert (out / "hello.txt").is_dir() and "is a directory" in res.stderr


def test_same_stem_twice(tmp_path, short_clip, hello):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(short_clip, tmp_path / d / "x.wav")
    jobs = plan_jobs([tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", hello])
    assert [j.stem for j in jobs] == ["a_x", "b_x", "hello"]
    res = cli(tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav", "--model", "tiny", "--mode", "transcribe",
              "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x.json", "a_x.txt", "b_x.json", "b_x.txt"]


# -- Ctrl-C: a real process and a real SIGINT ----------------------------------------------------------

def _interrupted(cmd, marker: str, timeout: float = 300.0) -> tuple[int, str]:
    """Runs `python -m ttt_cli *cmd`, sends SIGINT once `marker` appears on its stderr; returns (rc, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "ttt_cli", *map(str, cmd)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_TORCH_COMPILE": "1"})
    lines = []
    try:
        for line in p.stderr:
            lines.append(line)
            if marker in line:
                p.send_signal(signal.SIGINT)
                break
        rest = p.communicate(timeout=timeout)[1]
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, "".join(lines) + rest


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, short_clip):
    """infer and eval as subprocesses, SIGINT while they work: exit 130, finished outputs kept, the message
    says what to run next. Both run at once (two cores)."""
    long = tmp_path / "long.wav"
    t = np.arange(15 * SR) / SR
    sphn.write_wav(str(long), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SR)
    data = tmp_path / "data"
    for book, src in (("a", short_clip), ("b", long)):
        (data / "spk" / book).mkdir(parents=True)
        shutil.copy(src, data / "spk" / book / "1.wav")
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        inf = pool.submit(_interrupted, ["infer", short_clip, long, "--model", "tiny", "--out", tmp_path / "out",
                                         "--greedy"], "[start] long.wav")
        ev = pool.submit(_interrupted, ["eval", "librilight", data, "--model", "tiny", "--out", tmp_path / "res",
                                        "--block-steps", "1", "--codes-cache", tmp_path / "cache"], "[2/2] spk/b")
        (rc_i, err_i), (rc_e, err_e) = inf.result(), ev.result()
    assert rc_i == 130, err_i
    assert "interrupted: 1 file(s) finished" in err_i and f"run again on the others: {long}" in err_i
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["short.json", "short.txt", "short.wav"]
    assert "Traceback" not in err_i
    assert rc_e == 130, err_e
    assert "interrupted: 1 of 2 document(s) finished and kept" in err_e and "--resume" in err_e
    r = json.loads((tmp_path / "res" / "results.json").read_text())
    assert r["status"] == "interrupted" and [d["id"] for d in r["documents"]] == ["spk/a"]
    assert "Traceback" not in err_e


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
