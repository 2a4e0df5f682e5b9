"""Checkpoints the fine-tuning fork's own trainer wrote (tests/data/fork_golden/, made by
scripts/make-fork-golden.sh), loaded through ttt and compared with the logits the fork's own model gave
on the same codes (SPEC §4.3 "Fidelity"): with --base, as written with the base's files beside them,
and with the config a moshi user edits, through `load_model` and `ttt infer`."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ttt_cli import load_model
from ttt_cli.fastweights.attach import set_ttt_lr
from ttt_cli.models.presets import ensure_preset
from safety_helpers import cli, clip

GOLDEN = Path(__file__).parent / "data" / "fork_golden"
KINDS = ("full", "ttt-only", "lora-ttt", "ttt-unfreeze", "ttt-only-yarn4")
BASE_FILES = ("model.safetensors", "mimi.safetensors", "mimi_config.json", "tokenizer.model")  # what config.json names
TOL = 1e-4  # SPEC §4.3: relative per stream position; another program's kernels, so not bit-equal
CLIP_WARNING = "ignore:.*--ttt-clip"  # the trainer's clip, warned once per load (asserted where it matters)
REGENERATE = "regenerate the set with scripts/make-fork-golden.sh (see tests/data/fork_golden/README.md)"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "golden.json").read_text())


@pytest.fixture(scope="module")
def codes():
    return load_file(str(GOLDEN / "codes.safetensors"))["codes"]  # [1, K, T]


@pytest.fixture(scope="module")
def base(tmp_path_factory, golden):
    """The base the checkpoints were trained from: its config.json and LM weights as committed (checked
    against the checksums the script recorded), Mimi and tokenizer from the `tiny` preset (the script
    wrote the base with `ttt init-checkpoint --preset tiny`; neither enters the LM's logits)."""
    out = tmp_path_factory.mktemp("base")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(GOLDEN / "base" / name, out / name)
        assert sha256(out / name) == golden["base"]["sha256"][name], f"base/{name} is not the trained-from file: {REGENERATE}"
    tiny = ensure_preset("tiny")
    for name in ("mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copy(tiny / name, out / name)
    return out


def checkpoint(golden, kind) -> Path:
    """The committed `RUN/checkpoints/checkpoint_NNNNNN/consolidated/` folder of `kind`."""
    return GOLDEN / golden["kinds"][kind]["checkpoint"]


def copy_run(golden, kind, root: Path, base: Path | None = None, edit: bool = False) -> Path:
    """A copy of `kind`'s run folder; with `base`, the base's files put beside consolidated/ under the names
    its config.json gives; with `edit`, the config edited as a moshi user would (so that moshi's own loader
    finds the weights file). Returns the copy's consolidated/ folder."""
    src = checkpoint(golden, kind)
    folder = root / kind / src.relative_to(GOLDEN / kind)
    shutil.copytree(GOLDEN / kind / "checkpoints", root / kind / "checkpoints")
    cfg = json.loads((folder / "config.json").read_text())
    if base is not None:
        for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
            shutil.copy(base / Path(cfg[key]).name, folder / cfg[key])
    if edit:
        weights = golden["kinds"][kind]["weights"]
        cfg["lora_name" if weights == "lora.safetensors" else "moshi_name"] = weights
        (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    return folder


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub access fails loudly: a folder holding every file its config names must load offline."""
    import huggingface_hub
    from moshi.models import loaders

    def refuse(repo_id, filename, *a, **k):
        raise RuntimeError(f"the hub was asked for {repo_id}/{filename}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(loaders, "hf_hub_download", refuse)


def fork_logits(golden, kind, setting):
    ref = load_file(str(GOLDEN / golden["kinds"][kind]["logits"]))
    return ref[f"{setting}.text"], ref[f"{setting}.audio"]


def rel_per_position(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error of one stream position: [B, K, T, card] logits, all K and cards of a time step
    together; the positions moshi makes no prediction for (NaN, by its delays) must be the same."""
    assert torch.equal(got.isnan(), ref.isnan()), "NaN (no prediction) at other positions than the fork's"
    got, ref = got.nan_to_num(), ref.nan_to_num()
    num = (got - ref).transpose(1, 2).flatten(2).norm(dim=-1)  # [B, T]
    return (num / ref.transpose(1, 2).flatten(2).norm(dim=-1).clamp_min(1e-12)).max().item()


def assert_matches(m, codes, golden, kind, setting):
    with torch.no_grad():
        out = m.lm(codes)
    text, audio = fork_logits(golden, kind, setting)
    err = {"text": rel_per_position(out.text_logits, text), "audio": rel_per_position(out.logits, audio)}
    assert max(err.values()) <= TOL, f"{kind} ({setting}): relative error per position vs the fork {err}"


def load(source, golden, kind, setting="as_written", base=None):
    """load_model with the recorded setting's TTT overrides (golden.json: what the script set on the fork)."""
    overrides = golden["recording"]["sets"][setting]["ttt_overrides"] or None
    return load_model(str(source), base=None if base is None else str(base), device="cpu", dtype="fp32",
                      ttt=overrides)


def assert_ttt_tensors_from_checkpoint(m, golden, kind):
    """Target generators from the checkpoint's weights file (never a fresh init); W0 a saved w_down where
    the trainer saved one, else the base's linear_out (SPEC §4.3)."""
    k = golden["kinds"][kind]
    prov = m.provenance["ttt_tensors"]
    assert all(k["weights"] in origin for origin in prov["target"].values()), prov["target"]
    saves_w_down = kind in ("full", "ttt-unfreeze")
    for layer, origin in prov["w0"].items():
        assert (k["weights"] in origin) if saves_w_down else origin.startswith("linear_out"), (layer, origin)


def assert_files(m, files: dict):
    got = m.provenance["files"]
    for role, path in files.items():
        assert Path(got[role]).resolve() == path.resolve(), f"{role}: loaded {got[role]}, expected {path}"


# -- the golden set itself -----------------------------------------------------------------------------

def test_golden_set_is_whole_and_ttt_visibly_acts_in_it(golden, codes):
    for name, digest in golden["sha256"].items():
        assert sha256(GOLDEN / name) == digest, f"{name} changed since it was recorded: {REGENERATE}"
    assert set(golden["kinds"]) == set(KINDS) and golden["fork"]["commit"]
    assert codes.shape[-1] == golden["recording"]["codes"]["T"] >= 3 * 8  # several TTT chunks
    for kind in KINDS:
        k = golden["kinds"][kind]
        assert (checkpoint(golden, kind) / k["weights"]).is_file() and (checkpoint(golden, kind) / "config.json").is_file()
        off = fork_logits(golden, kind, "lr0")
        for setting in ("as_written", "clip_none"):  # TTT changes the fork's own logits by >= 5%
            on = fork_logits(golden, kind, setting)
            assert min(rel_per_position(a, b) for a, b in zip(on, off)) >= 0.05, (kind, setting)


# -- (ii) with --base: the files the config names come from the base -------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_with_base_matches_the_fork(golden, base, codes, kind):
    folder = checkpoint(golden, kind)
    full = golden["kinds"][kind]["weights"] == "consolidated.safetensors"
    with pytest.warns(UserWarning, match="--ttt-clip"):  # the trainer's clip, which no config key states
        m = load(folder, golden, kind, base=base)
    assert m.ttt.layers == [1, 3] and m.ttt.delta_clip_fro_norm == 1e-5 and len(m.warnings) == 1
    assert_matches(m, codes, golden, kind, "as_written")
    assert_ttt_tensors_from_checkpoint(m, golden, kind)
    assert_files(m, {"lm_weights": folder / "consolidated.safetensors" if full else base / "model.safetensors",
                     "mimi": base / "mimi.safetensors", "tokenizer": base / "tokenizer.model"})
    where = m.provenance["from"]
    assert where["mimi"].startswith("base") and where["tokenizer"].startswith("base")
    assert where["moshi"].startswith("checkpoint") if full else where["moshi"].startswith("base")
    if "yarn" in kind:
        assert m.lm.transformer.layers[0].self_attn.context == 32 * 4  # the fork's inference: context x scale
    m = load(folder, golden, kind, "clip_none", base=base)
    assert not m.warnings
    assert_matches(m, codes, golden, kind, "clip_none")
    set_ttt_lr(m.lm, 0.0)
    assert_matches(m, codes, golden, kind, "lr0")


# -- (i) as written, the base's files beside consolidated/: offline, no --base ---------------------------

@pytest.mark.filterwarnings(CLIP_WARNING)
@pytest.mark.parametrize("kind", KINDS)
def test_as_written_with_base_files_beside(tmp_path, golden, base, codes, kind, no_hub):
    folder = copy_run(golden, kind, tmp_path, base=base)
    full = golden["kinds"][kind]["weights"] == "consolidated.safetensors"
    for source in (folder, folder.parent):  # consolidated/ and its checkpoint_NNNNNN/ parent
        m = load(source, golden, kind)
        assert_matches(m, codes, golden, kind, "as_written")
        assert_ttt_tensors_from_checkpoint(m, golden, kind)
        # LM weights: consolidated.safetensors for full fine-tuning whatever moshi_name says (SPEC §4.3)
        assert_files(m, {"lm_weights": folder / ("consolidated.safetensors" if full else "model.safetensors"),
                         "mimi": folder / "mimi.safetensors", "tokenizer": folder / "tokenizer.model",
                         "mimi_config": folder / "mimi_config.json"})
        assert not any(w.startswith("base") for w in m.provenance["from"].values()), m.provenance["from"]
        assert [w for w in m.warnings if "--ttt-clip" not in w] == []


# -- (iii) the config edited as a moshi user would: lora_name / moshi_name added --------------------------

@pytest.mark.filterwarnings(CLIP_WARNING)
@pytest.mark.parametrize("kind", KINDS)
def test_config_edited_for_moshi_is_still_the_forks(tmp_path, golden, base, codes, kind, no_hub):
    """Adding `lora_name` (or `moshi_name: consolidated.safetensors`) does not make it another format: the
    TTT tensors still come from the weights file, the logits are still the fork's."""
    folder = copy_run(golden, kind, tmp_path / "beside", base=base, edit=True)
    m = load(folder.parent, golden, kind)
    assert_matches(m, codes, golden, kind, "as_written")
    assert_ttt_tensors_from_checkpoint(m, golden, kind)
    assert m.config["ttt_origin"] == "fork" and m.provenance["format"] == "moshi_in_place"
    assert [w for w in m.warnings if "--ttt-clip" not in w] == []  # no "lacks TTT tensors" fresh init
    folder = copy_run(golden, kind, tmp_path / "with-base", edit=True)  # base files elsewhere: --base
    m = load(folder, golden, kind, base=base)
    assert_matches(m, codes, golden, kind, "as_written")
    assert_ttt_tensors_from_checkpoint(m, golden, kind)


# -- the command line ------------------------------------------------------------------------------------

def infer(tmp_path, *args):
    r = cli("infer", clip(tmp_path / "clip.wav", 0.5, 1.0), "--greedy", "--out", tmp_path / "out", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["results"][0]


@pytest.mark.filterwarnings(CLIP_WARNING)
def test_cli_infer_with_base(tmp_path, golden, base):
    kind = "ttt-only-yarn4"
    folder = checkpoint(golden, kind)
    res = infer(tmp_path, "--model", folder.parent, "--base", base)
    prov = res["model"]["provenance"]
    assert Path(prov["files"]["adapters"]) == folder / "lora.safetensors"
    assert Path(prov["files"]["lm_weights"]) == base / "model.safetensors" and prov["step"] == 4
    assert res["ttt"]["config"]["layers"] == [1, 3] and res["ttt"]["config"]["chunk_size"] == 8


@pytest.mark.filterwarnings(CLIP_WARNING)
def test_cli_infer_as_written_with_base_files_beside(tmp_path, golden, base, no_hub):
    kind = "ttt-only-yarn4"
    folder = copy_run(golden, kind, tmp_path / "run", base=base)
    prov = infer(tmp_path, "--model", folder)["model"]["provenance"]
    assert Path(prov["files"]["adapters"]) == folder / "lora.safetensors"
    for role, name in (("lm_weights", "model.safetensors"), ("mimi", "mimi.safetensors"),
                       ("tokenizer", "tokenizer.model")):
        assert Path(prov["files"][role]) == folder / name, (role, prov["files"])
