"""bf16 parity with moshi (SPEC §3.4b): a frozen fast weight computes moshi's module in the model dtype, so
`ttt infer --no-ttt --greedy --dtype bf16` gives what `python -m moshi.run_inference` gives."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn
import torch

from ttt_cli import load_model, ttt_layers
from ttt_cli.models.presets import ensure_preset

HELLO = Path(__file__).resolve().parents[1] / "examples" / "hello.wav"


@pytest.fixture(scope="module")
def moshi_layout(tmp_path_factory):
    """tiny as a plain moshi checkpoint both tools read: no `ttt` section, greedy `lm_gen_config`, and the
    Mimi config named with `file://` (moshi's CLI would otherwise look it up on the hub)."""
    src, out = ensure_preset("tiny"), tmp_path_factory.mktemp("moshi-layout")
    for f in ("model.safetensors", "mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copy(src / f, out / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("ttt")
    cfg["mimi_config_name"] = f"file://{out / 'mimi_config.json'}"
    cfg["lm_gen_config"] = {**cfg.get("lm_gen_config", {}), "use_sampling": False}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_frozen_layer_is_moshis_module_in_bf16(moshi_layout):
    """TTT off (lr 0): bit-identical logits to moshi's own modules in bf16; TTT on: fast weights float32."""
    plain = load_model(str(moshi_layout), device="cpu", dtype="bf16", ttt=False)
    frozen = load_model(str(moshi_layout), device="cpu", dtype="bf16", ttt={"lr": 0, "layers": [0, 2]})
    assert sorted(ttt_layers(frozen.lm)) == [0, 2]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (2, plain.lm.num_codebooks, 40), generator=g)
    codes[:, 0] = torch.randint(0, plain.lm.text_card, (2, 40), generator=g)
    with torch.no_grad():
        a, b = plain.lm(codes), frozen.lm(codes)
    assert a.logits.dtype == torch.bfloat16
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())
    # layer level, on enough rows that a float32 down projection would round differently somewhere
    x = (torch.randn(4, 256, plain.lm.dim, generator=g) * 3).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ttt_layers(frozen.lm)[0](x), plain.lm.transformer.layers[0].gating(x))
    on = load_model(str(moshi_layout), device="cpu", dtype="bf16", ttt={"lr": 0.05, "layers": [0, 2],
                                                                        "chunk_size": 8})
    layer = ttt_layers(on.lm)[0]
    with torch.no_grad(), on.lm.streaming(1):
        on.lm.forward_text(codes[:1, :, :9])
        st = layer._streaming_state
        assert st.w.dtype == torch.float32 and st.updates[0] == 1 and layer.w_down.dtype == torch.float32


def _moshi_text(stdout: str) -> str:
    """The tokens moshi's RawPrinter wrote: between its "loading input file" and "writing" log lines."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    body = plain.split("loading input file", 1)[1].split("\n", 1)[1]
    return body.split("[Info] writing", 1)[0]


def test_cli_no_ttt_bf16_is_moshi_run_inference(moshi_layout, tmp_path):
    pcm, sr = sphn.read(str(HELLO), sample_rate=24000)
    clip = tmp_path / "clip.wav"
    sphn.write_wav(str(clip), pcm[:1, : 36000], 24000)  # 1.5 s: 18 steps per tool
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "HF_HUB_OFFLINE": "1"}
    d = moshi_layout
    peer = subprocess.run(
        [sys.executable, "-m", "moshi.run_inference", "--device", "cpu", "--batch-size", "1",
         "--config", str(d / "config.json"), "--moshi-weight", str(d / "model.safetensors"),
         "--mimi-weight", str(d / "mimi.safetensors"), "--tokenizer", str(d / "tokenizer.model"),
         str(clip), str(tmp_path / "moshi.wav")], capture_output=True, text=True, env=env, timeout=600)
    assert peer.returncode == 0, peer.stderr[-2000:]
    ours = subprocess.run(
        [sys.executable, "-m", "ttt_cli", "infer", str(clip), "--model", str(d), "--no-ttt", "--greedy",
         "--dtype", "bf16", "--device", "cpu", "--out", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, env=env, timeout=600)
    assert ours.returncode == 0, ours.stderr[-2000:]
    res = json.loads(ours.stdout)["results"][0]
    assert res["model"]["dtype"] == "bfloat16" and res["ttt"]["enabled"] is False
    # text: moshi prints every token but 0 and 3, "▁" as a space
    text = "".join(t["piece"].replace("▁", " ") for t in res["tokens"] if t["id"] not in (0, 3))
    assert text == _moshi_text(peer.stdout) and text.strip()
    # audio: both decode their audio tokens with the same Mimi, step by step: equal samples <=> equal tokens
    a, _ = sphn.read(str(tmp_path / "moshi.wav"))
    b, _ = sphn.read(res["audio_out"])
    assert a.shape == b.shape and np.array_equal(a, b)
