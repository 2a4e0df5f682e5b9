"""Checkpoints: presets, the resolver, the fork's format, init-checkpoint, TTT off == plain moshi."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ttt_cli import load_model, ttt_layers
from ttt_cli.models.resolver import resolve
from ttt_cli.fastweights.config import TTTConfig
from ttt_cli.models.config import parse_layers
from ttt_cli.units import parse_seconds, seconds_to_steps
from ttt_cli.errors import CheckpointError, ConfigError
from ttt_cli.models.presets import build_preset, directory_digest, preset_dir


def plain_moshi(directory, dtype=torch.float32):
    """moshi's own loader on the preset's files, with the `ttt` section removed from the config."""
    from moshi.models.loaders import CheckpointInfo
    cfg = json.loads((directory / "config.json").read_text())
    cfg.pop("ttt")
    tmp = directory.parent / f"{directory.name}-plain-config.json"
    tmp.write_text(json.dumps(cfg))
    info = CheckpointInfo.from_hf_repo("local", moshi_weights=directory / cfg["moshi_name"],
                                       mimi_weights=directory / cfg["mimi_name"],
                                       tokenizer=directory / cfg["tokenizer_name"], config_path=tmp,
                                       mimi_config_path=directory / cfg["mimi_config_name"])
    return info.get_moshi(device="cpu", dtype=dtype), info


def codes_for(lm, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (2, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (2, T), generator=g)
    return codes


def logits(lm, codes):
    with torch.no_grad():
        out = lm(codes)
    return out.logits.nan_to_num(), out.text_logits.nan_to_num()


def test_ttt_off_and_lr_zero_equal_plain_moshi(tiny):
    ref_lm, _ = plain_moshi(preset_dir("tiny"))
    codes = codes_for(ref_lm)
    ref = logits(ref_lm, codes)
    for ttt in (False, {"lr": 0}):
        m = load_model("tiny", device="cpu", dtype="fp32", ttt=ttt)
        assert bool(ttt_layers(m.lm)) == (ttt is not False)
        got = logits(m.lm, codes)
        for a, b in zip(got, ref):
            assert (a - b).abs().max().item() <= 1e-5
    on = logits(tiny.lm, codes)  # TTT on really differs (beyond one 16-step chunk)
    assert (on[1] - ref[1]).abs().max().item() > 1e-3


def test_presets_are_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_preset("tiny", a)
    build_preset("tiny", b)
    assert directory_digest(a) == directory_digest(b) == directory_digest(preset_dir("tiny"))
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["context"] <= 64 and cfg["ttt"]["chunk_size"] <= 16 and cfg["dep_q"] == 8
    assert len(cfg["ttt"]["layers"]) >= 2 and cfg["mimi_config_name"] == "mimi_config.json"


def test_tiny_stt_preset(tiny_stt):
    assert tiny_stt.lm.dep_q == 0 and tiny_stt.model_type == "stt"
    assert {"audio_delay_seconds", "audio_silence_prefix_seconds"} <= set(tiny_stt.info.stt_config)
    assert len(ttt_layers(tiny_stt.lm)) == 2


def _copy_tiny(tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(preset_dir("tiny"), out)
    return out


def test_bad_checkpoints_give_clear_errors(tmp_path):
    out = _copy_tiny(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["ttt"]["learning_rate"] = 1.0
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"learning_rate.*Valid keys: variant, layers, chunk_size, lr"):
        load_model(str(out), device="cpu")
    cfg["ttt"].pop("learning_rate")
    cfg["ttt"]["layers"] = [1, 9]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"layers \[9\] do not exist"):
        load_model(str(out), device="cpu")
    cfg["ttt"]["layers"] = [1, 3]
    (out / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(out / "ttt.safetensors"))
    t["transformer.layers.1.gating.w_down"] = torch.zeros(3, 3)
    save_file(t, str(out / "ttt.safetensors"))
    with pytest.raises(CheckpointError, match=r"w_down has shape \(3, 3\)"):
        load_model(str(out), device="cpu")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"files that do not exist: moshi_name"):
        load_model(str(out), device="cpu")
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a hub id"):
        resolve("./nowhere/at/all")


def test_hub_source_offline_is_one_clear_paragraph(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        resolve("kyutai/not-a-real-repo@v1")
    msg = str(e.value)
    assert "kyutai/not-a-real-repo@v1" in msg and "--model tiny" in msg and "\n" not in msg


def test_init_checkpoint_round_trip(tmp_path):
    from ttt_cli.cli.app import app
    runner = CliRunner()
    out = tmp_path / "zero"
    r = runner.invoke(app, ["init-checkpoint", "--preset", "tiny", "--out", str(out), "--layers", "every:2@1",
                            "--target-init", "zero", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ttt"]["layers"] == [1, 3] and "ttt.safetensors" in report["files"]
    m = load_model(str(out), device="cpu", dtype="fp32")
    assert all(torch.count_nonzero(l.target_generator.W_target.weight) == 0 for l in ttt_layers(m.lm).values())
    # W_target = 0: TTT has no effect, the model is plain moshi
    ref_lm, _ = plain_moshi(preset_dir("tiny"))
    codes = codes_for(ref_lm)
    for a, b in zip(logits(m.lm, codes), logits(ref_lm, codes)):
        assert (a - b).abs().max().item() <= 1e-5
    r = runner.invoke(app, ["init-checkpoint", "--preset", "tiny", "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    # from a local directory (base weights referenced, not copied) with other TTT keys
    out2 = tmp_path / "from-dir"
    r = runner.invoke(app, ["init-checkpoint", "--from", str(out), "--out", str(out2), "--layers", "0",
                            "--chunk-size", "8", "--conv-kernel-size", "3", "--conv-padding", "center"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out2 / "config.json").read_text())
    assert cfg["ttt"]["layers"] == [0] and cfg["ttt"]["conv_padding"] == "center"
    assert cfg["moshi_name"].startswith("/") and not (out2 / "model.safetensors").exists()
    m2 = load_model(str(out2), device="cpu")
    assert ttt_layers(m2.lm)[0].target_generator.conv1d.conv.weight.shape[-1] == 3


def test_overrides_and_parsers():
    m = load_model("tiny", device="cpu", ttt={"layers": "every:2", "chunk_size": 4, "lr": 0.1})
    assert sorted(ttt_layers(m.lm)) == [0, 2] and m.ttt.chunk_size == 4
    with pytest.raises(ConfigError, match="Valid keys"):
        load_model("tiny", device="cpu", ttt={"chunk": 4})
    assert parse_layers("0,6,12") == [0, 6, 12] and parse_layers("every:6", 32) == [0, 6, 12, 18, 24, 30]
    assert parse_layers("every:6@3", 20) == [3, 9, 15]
    assert parse_seconds("1.5") == 1.5 and parse_seconds("30s") == 30 and parse_seconds("2m") == 120
    assert seconds_to_steps(1.5) == 19 and seconds_to_steps(2) == 25
    with pytest.raises(ConfigError):
        parse_seconds("soon")


def test_help_does_not_import_torch():
    code = ("import sys; from ttt_cli.cli.app import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_init_checkpoint_copy_base_and_target_source(tmp_path):
    """--copy-base: the base files are copied (byte-identical, named relative to the folder);
    --target-source text reaches the config and every layer."""
    from ttt_cli.cli.app import app
    src = preset_dir("tiny")
    out = tmp_path / "copied"
    r = CliRunner().invoke(app, ["init-checkpoint", "--from", str(src), "--out", str(out), "--copy-base",
                                 "--target-source", "text", "--layers", "2", "--json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):
        assert cfg[key] == src_cfg[key] and "/" not in cfg[key]
        assert (out / cfg[key]).read_bytes() == (src / src_cfg[key]).read_bytes()
    assert cfg["ttt"]["target_source"] == "text" and cfg["ttt"]["layers"] == [2]
    m = load_model(str(out), device="cpu", dtype="fp32")
    assert [(i, l.target_source) for i, l in ttt_layers(m.lm).items()] == [(2, "text")]
    t = load_file(str(out / "ttt.safetensors"))  # §3.6 init: w_down <- linear_out, ntp target
    base = load_file(str(src / src_cfg["moshi_name"]))
    assert torch.equal(t["transformer.layers.2.gating.w_down"], base["transformer.layers.2.gating.linear_out.weight"])
    conv = t["transformer.layers.2.gating.target_generator.conv1d.conv.weight"]
    assert torch.equal(conv[:, :, 1], torch.eye(conv.shape[0])) and not conv[:, :, 0].any()
    r = CliRunner().invoke(app, ["init-checkpoint", "--from", str(src), "--out", str(tmp_path / "x"),
                                 "--target-source", "audio"])
    assert r.exit_code == 2 and "target_source" in r.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("key,value,message", [
    ("variant", "nope", "variant 'nope' is not supported"),
    ("layers", "1,3", "layers must be a list of integers"),
    ("layers", [1, True], "layers must be a list of integers"),
    ("layers", [1, 1], "layers has duplicates"),
    ("layers", [1, 9], r"layers \[9\] do not exist: the model has 4 layers"),
    ("chunk_size", 0, "chunk_size must be a positive integer"),
    ("chunk_size", 1.5, "chunk_size must be a positive integer"),
    ("lr", -0.1, "lr must be a finite number >= 0"),
    ("lr", float("nan"), "lr must be a finite number >= 0"),
    ("lr", "fast", "lr must be a finite number >= 0"),
    ("conv_kernel_size", 0, "conv_kernel_size must be a positive integer"),
    ("conv_padding", "left", "conv_padding must be one of"),
    ("target_source", "audio", "target_source must be one of"),
    ("delta_clip_fro_norm", 0, "delta_clip_fro_norm must be a number > 0 or null"),
    ("delta_clip_fro_norm", "big", "delta_clip_fro_norm must be a number > 0 or null"),
    ("delta_clip_epsilon", 0, "delta_clip_epsilon must be a number > 0"),
    ("ttt_name", "", "ttt_name must be a file name"),
])
def test_ttt_config_validation(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TTTConfig.from_dict({"layers": [1, 3], key: value}, num_layers=4)
    assert TTTConfig.from_dict({"layers": [3, 1]}, num_layers=4).layers == [1, 3]  # sorted, valid


def test_ttt_section_shape_and_layer_syntax_errors():
    with pytest.raises(ConfigError, match="must be a JSON object"):
        TTTConfig.from_dict([1, 3])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in the `ttt` config section of variant .inplace.: chunk\. Valid keys"):
        TTTConfig.from_dict({"chunk": 3})
    for spec, msg in (("every:0", "the step must be >= 1"), ("one,two", "expected e.g."), ("every:2", "needs the model")):
        with pytest.raises(ConfigError, match=msg):
            parse_layers(spec, None if spec == "every:2" else 4)
    assert parse_layers("none") == [] and parse_layers(" 3, 1,3 ") == [1, 3]


@pytest.mark.parametrize("preset", ["tiny", "tiny-stt", "tiny-mlp", "tiny-adapter"])
def test_init_checkpoint_preset_writes_that_preset(tmp_path, preset):
    """SPEC §4.1: what `--preset P` writes is P: its config and every file identical (TTT tensors compared
    tensor by tensor with P's own ttt.safetensors), so `--model <written>` gives `--model P`'s logits."""
    from ttt_cli.cli.app import app
    out = tmp_path / preset
    r = CliRunner().invoke(app, ["init-checkpoint", "--preset", preset, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    src = preset_dir(preset)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    written, own = load_file(str(out / "ttt.safetensors")), load_file(str(src / "ttt.safetensors"))
    assert sorted(written) == sorted(own)
    for k in own:
        assert written[k].dtype == own[k].dtype and torch.equal(written[k], own[k]), k
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for f in out.iterdir():
        assert f.read_bytes() == (src / f.name).read_bytes() or f.name in ("config.json", "ttt.safetensors"), f.name
    assert json.loads(r.stdout)["ttt_tensors_from_source"] == [1, 3]
    a, b = load_model(str(out), device="cpu", dtype="fp32"), load_model(preset, device="cpu", dtype="fp32")
    codes = codes_for(b.lm, T=40)
    with torch.no_grad():  # text logits: STT models (dep_q = 0) have no depformer to run
        x, y = a.lm.forward_text(codes)[1], b.lm.forward_text(codes)[1]
    assert (x - y).abs().max().item() <= 1e-6 * max(1.0, y.abs().max().item())
    if b.lm.dep_q:
        for x, y in zip(logits(a.lm, codes), logits(b.lm, codes)):
            assert (x - y).abs().max().item() <= 1e-6 * max(1.0, y.abs().max().item())


def test_init_checkpoint_fresh_tensors_only_where_asked(tmp_path):
    """A subset of P's layers keeps P's tensors; an option that changes what the tensors are (--rank) gives
    the documented fresh init, and says why."""
    from ttt_cli.cli.app import app
    run = CliRunner().invoke
    r = run(app, ["init-checkpoint", "--preset", "tiny-mlp", "--layers", "3", "--out", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    own = load_file(str(preset_dir("tiny-mlp") / "ttt.safetensors"))
    written = load_file(str(tmp_path / "m" / "ttt.safetensors"))
    assert sorted(written) == sorted(k for k in own if k.startswith("transformer.layers.3."))
    assert all(torch.equal(written[k], own[k]) for k in written)
    r = run(app, ["init-checkpoint", "--preset", "tiny-adapter", "--rank", "8", "--out", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ttt_tensors_from_source"] == [] and "rank differs" in res["notes"][0]
    wo = load_file(str(tmp_path / "a" / "ttt.safetensors"))["transformer.layers.1.gating.linear_out.ttt_adapter.wo"]
    assert wo.shape == (64, 8) and not wo.any()  # SPEC §3.11: a fresh adapter has Wo = 0
