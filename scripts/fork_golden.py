"""Runs the fine-tuning fork's own trainer and loader (AlufRon/moshi_in_place) to make tests/data/fork_golden/.

Driven by scripts/make-fork-golden.sh, in a venv whose sys.path puts the fork's `moshi` package (and its
`moshi-finetune/`) first. Nothing here computes what the golden files hold: it calls the fork's
`train.train` and `moshi.run_inference.main` and only adapts where they run (CPU, world size 1, fp32,
a local folder standing in for the hub) and works around the output-neutral loader defect of SPEC §4.3
that these checkpoints meet (`lora: true`). Never imported by `ttt`.

    python fork_golden.py data DIR                     # a dialogue in the trainer's dataset format
    python fork_golden.py train KIND --work W --base B # one run of the trainer: W/runs/KIND
    python fork_golden.py record KIND --work W --base B --out O  # the fork model's logits on fixed codes
    python fork_golden.py manifest --work W --base B --out O --commit C    # O/golden.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

# -- what is trained (recorded in golden.json by make-fork-golden.sh) ---------------------------------
STEPS = 4                       # optimizer steps per run; the trainer saves checkpoint_000004 at the end
DURATION_SEC = 4.0              # 50 frames at 12.5 Hz per training sample
# TTT on tiny's 4 layers: layers 1 and 3, chunks of 8 steps. The trainer never passes a clip to its TTT
# layers, so they run with the fork's default delta clip 1e-5: the learning rate is chosen so that the
# clipped update (at most 1e-5 * lr per chunk in Frobenius norm) changes the logits clearly.
TTT = {"enabled": True, "layer_frequency": 2, "start_layer": 1, "chunk_size": 8, "learning_rate": 20000.0,
       "conv_kernel_size": 2}
TRAINER_CLIP = 1e-5             # TTTGating's default `delta_clip_fro_norm` (the trainer cannot set another)
LR_CLIP_NONE = 0.1              # the rate of the second recorded set, with the clip removed
YARN = {"enabled": True, "scale": 4.0, "original_max_seq_len": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.5, "mscale_all_dim": 0.0}
LORA = {"enable": True, "rank": 4, "scaling": 2.0, "ft_embed": False}
KINDS = {  # name -> the TrainArgs that differ from the common ones
    "full": {"full_finetuning": True, "save_adapters": False, "lora": {"enable": False}},
    "ttt-only": {},
    "lora-ttt": {"lora": LORA},
    "ttt-unfreeze": {"ttt": {**TTT, "unfreeze_ttt_layers": True}},
    "ttt-only-yarn4": {"yarn": YARN},
}
CODES_SEED, CODES_T = 2024, 48  # the recorded code sequence: 6 chunks, beyond tiny's context of 32
HUB_ID = "local/tiny-base"      # `--hf-repo` of the fork's run_inference, served from the base folder


def train_args(kind: str, work: Path, base: Path) -> dict:
    """The trainer's YAML config for one kind (base files given as local paths: a run from a local base)."""
    args = {
        "data": {"train_data": str(work / "data" / "train.jsonl"), "eval_data": "", "shuffle": False},
        "run_dir": str(work / "runs" / kind),
        "moshi_paths": {"hf_repo_id": None, "moshi_path": str(base / "model.safetensors"),
                        "mimi_path": str(base / "mimi.safetensors"), "tokenizer_path": str(base / "tokenizer.model"),
                        "config_path": str(base / "config.json")},
        "duration_sec": DURATION_SEC, "batch_size": 1, "num_microbatches": 1, "max_steps": STEPS,
        "max_norm": 1.0, "log_freq": 1, "ckpt_freq": 0, "do_ckpt": True, "num_ckpt_keep": 1,
        "do_eval": False, "save_adapters": True, "full_finetuning": False, "seed": 0,
        "optim": {"lr": 1e-2, "weight_decay": 0.1, "pct_start": 0.5},
        "lora": {"enable": False}, "ttt": dict(TTT), "yarn": {"enabled": False},
        "param_dtype": "float32", "gradient_checkpointing": False,
        "wandb": {"project": None}, "overwrite_run_dir": False,
    }
    args.update(KINDS[kind])
    return args


# -- data: the trainer's dataset format --------------------------------------------------------------

def make_data(out: Path) -> None:
    """A stereo 24 kHz dialogue in the trainer's dataset format: train.jsonl ({path, duration}) and, beside
    the wav, a .json with the word alignments. Channel 0 (the model's own voice) is syllable-like bursts
    of noise and chirps, channel 1 (the user) a quiet hum, from a fixed seed. The alignments are empty:
    the trainer's `tokenize` looks up a newline piece for every word, which tiny's tokenizer does not
    have, so its text stream is padding."""
    import sphn
    out.mkdir(parents=True, exist_ok=True)
    sr, rng = 24000, np.random.default_rng(0)
    n = int(DURATION_SEC * 3 * sr)
    t = np.arange(n) / sr
    voice = np.zeros(n, dtype=np.float32)
    start = 0.2
    while start < t[-1] - 0.5:
        dur = rng.uniform(0.15, 0.4)
        i, j = int(start * sr), int((start + dur) * sr)
        f0 = rng.uniform(120, 300)
        seg = t[: j - i]
        env = np.sin(np.pi * seg / dur) ** 2
        voice[i:j] = env * (0.3 * np.sin(2 * np.pi * (f0 + 200 * seg) * seg) + 0.05 * rng.standard_normal(j - i))
        start += dur + rng.uniform(0.05, 0.3)
    other = (0.05 * np.sin(2 * np.pi * 220 * t) + 0.03 * np.sin(2 * np.pi * 331 * t)).astype(np.float32)
    sphn.write_wav(str(out / "dialog.wav"), np.stack([voice, other]).astype(np.float32), sr)
    (out / "dialog.json").write_text(json.dumps({"alignments": []}) + "\n")
    (out / "train.jsonl").write_text(json.dumps({"path": str(out / "dialog.wav"), "duration": n / sr}) + "\n")


# -- running the fork's code on this machine ---------------------------------------------------------

class CudaOnCpu(TorchFunctionMode):
    """The trainer places tensors with the literal device "cuda" (`.cuda()`, `device="cuda"`, Mimi);
    here they stay on the CPU. Placement only: every value computed is the same."""

    @staticmethod
    def _cpu(x):
        return "cpu" if isinstance(x, (str, torch.device)) and str(x).startswith("cuda") else x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = self._cpu(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(self._cpu(a) for a in args)
        return func(*args, **kwargs)


def run_trainer(kind: str, work: Path, base: Path) -> None:
    """The fork's `train.train` on one YAML config: gloo process group of one (its own code calls
    barrier/all_reduce and would ask NCCL), tensors on the CPU."""
    import torch.distributed as dist
    import yaml
    import train as fork_train  # moshi-finetune/train.py

    cfg = work / "configs" / f"{kind}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(train_args(kind, work, base), sort_keys=False))
    os.environ.pop("LOCAL_RANK", None)  # the trainer would then init NCCL and select a CUDA device
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            # relative file names in the base's config.json (mimi_config_name) are read from the cwd
            os.chdir(base)
            with CudaOnCpu():
                fork_train.train(str(cfg))
        finally:
            dist.destroy_process_group()


def checkpoint_dir(work: Path, kind: str) -> Path:
    """The trainer's last checkpoint folder (RUN/checkpoints/checkpoint_NNNNNN/consolidated)."""
    found = sorted((work / "runs" / kind / "checkpoints").glob("checkpoint_*/consolidated"))
    if len(found) != 1:
        raise SystemExit(f"{kind}: expected one checkpoint folder, found {[str(f) for f in found]}")
    return found[0]


def load_with_run_inference(ckpt: Path, base: Path, wav: Path) -> tuple[torch.nn.Module, dict]:
    """The LM as the fork's `moshi.run_inference` builds it for this checkpoint.

    Its `main()` runs with the arguments a user gives (`--lora-weights` for lora.safetensors;
    `--moshi-weight` + `--config` for consolidated.safetensors) and `--hf-repo` naming the base, which a
    local folder serves. Adapted: dtype float32 (its CLI offers bf16/fp16 only), its streaming run
    skipped (the LM is taken once built), and SPEC §4.3's loader defect worked around: for `lora: true`
    the telemetry buffer `ttt_clip_event_counter` stays on the meta device and `.to()` dies, so zeros
    are put there first (it only counts clip events).
    """
    from moshi import run_inference
    from moshi.models import loaders

    seen: dict = {"workarounds": []}

    def hub(repo, filename, **_):
        if repo != HUB_ID:
            raise RuntimeError(f"offline: {repo}/{filename} was asked for")
        return str(base / filename)

    def get_moshi(self, device="cpu", dtype=None, load_weight=True, **kw):
        seen["asked_dtype"] = str(dtype)
        seen["lm_kwargs_overrides"] = kw.get("lm_kwargs_overrides")
        return orig_get_moshi(self, device=device, dtype=torch.float32, load_weight=load_weight, **kw)

    def get_lora_moshi(model, *a, **k):
        seen["workarounds"] += materialise_counters(model)
        return orig_lora(model, *a, **k)

    class Capture:
        def __init__(self, checkpoint_info, mimi, text_tokenizer, lm, *a, **k):
            seen["lm"], seen["info"] = lm, checkpoint_info

        def run(self, in_pcms):
            return []

    orig_get_moshi, orig_lora = loaders.CheckpointInfo.get_moshi, loaders.get_lora_moshi
    loaders.hf_hub_download, loaders.get_lora_moshi = hub, get_lora_moshi
    loaders.CheckpointInfo.get_moshi = get_moshi
    run_inference.InferenceState = Capture
    if (ckpt / "lora.safetensors").exists():
        argv = ["--lora-weights", str(ckpt / "lora.safetensors")]
    else:
        argv = ["--moshi-weight", str(ckpt / "consolidated.safetensors"), "--config", str(ckpt / "config.json")]
    sys.argv = ["run_inference", "--hf-repo", HUB_ID, "--device", "cpu", *argv, str(wav)]
    run_inference.main()
    lm = seen.pop("lm")
    meta = [n for n, t in lm.named_parameters() if t.is_meta]
    if meta:
        raise SystemExit(f"{ckpt}: the fork's loader left parameters on the meta device: {meta[:5]}")
    seen["argv"] = [a.replace(str(ckpt), "CHECKPOINT").replace(str(wav), "clip.wav") for a in sys.argv[1:]]
    return lm, seen


def materialise_counters(model) -> list[str]:
    """Zeros for `ttt_clip_event_counter` buffers on the meta device (a count of clip events that no
    output reads), so that get_lora_moshi's `.to()` can run; says what was done."""
    done = []
    for name, m in model.named_modules():
        b = m._buffers.get("ttt_clip_event_counter")
        if b is not None and b.is_meta:
            m._buffers["ttt_clip_event_counter"] = torch.zeros(b.shape, dtype=b.dtype)
            done.append(f"{name}.ttt_clip_event_counter: meta -> zeros before get_lora_moshi's .to()")
    return done


# -- recording ---------------------------------------------------------------------------------------

def fixed_codes(lm) -> torch.Tensor:
    """[1, K, T] codes: random text and audio tokens from a fixed seed."""
    g = torch.Generator().manual_seed(CODES_SEED)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, CODES_T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (1, CODES_T), generator=g)
    return codes


def rel_per_position(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative difference of one stream position: logits [B, K, T, card], NaN (no prediction) as 0."""
    a, b = a.nan_to_num(), b.nan_to_num()
    num = (a - b).transpose(1, 2).flatten(2).norm(dim=-1)  # [B, T]
    return (num / b.transpose(1, 2).flatten(2).norm(dim=-1).clamp_min(1e-12)).max().item()


def record(kind: str, work: Path, base: Path, out: Path) -> None:
    """Logits of the fork's model, training-mode forward (chunk-parallel, what the trainer optimised;
    the LM has no dropout), fp32, in three settings: as written (the config's lr, the trainer's clip),
    clip removed with LR_CLIP_NONE, and lr 0 (TTT's update off: the fast weights stay W0)."""
    from safetensors.torch import save_file
    ckpt = checkpoint_dir(work, kind)
    lm, seen = load_with_run_inference(ckpt, base, work / "data" / "dialog.wav")
    gatings = {i: l.gating for i, l in enumerate(lm.transformer.layers) if getattr(l, "use_ttt", False)}
    codes = fixed_codes(lm)
    lm.train()

    def forward():
        with torch.no_grad():
            o = lm(codes)
        return {"text": o.text_logits.contiguous(), "audio": o.logits.contiguous()}

    layers = {i: {"chunk_size": g.chunk_size, "lr": g.ttt_lr, "delta_clip_fro_norm": g.delta_clip_fro_norm}
              for i, g in gatings.items()}
    sets = {"as_written": forward()}
    for g in gatings.values():
        g.delta_clip_fro_norm, g.ttt_lr = None, LR_CLIP_NONE
    sets["clip_none"] = forward()
    for g in gatings.values():
        g.ttt_lr = 0.0
    sets["lr0"] = forward()
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{s}.{k}": v for s, d in sets.items() for k, v in d.items()}, str(out / "logits.safetensors"))
    save_file({"codes": codes}, str(out.parent / "codes.safetensors"))
    effect = {s: {k: rel_per_position(sets[s][k], sets["lr0"][k]) for k in ("text", "audio")}
              for s in ("as_written", "clip_none")}
    info = {"run_inference_args": seen["argv"], "lm_kwargs_overrides": seen["lm_kwargs_overrides"],
            "dtype_asked_by_run_inference": seen["asked_dtype"], "workarounds": seen["workarounds"],
            "ttt_layers_as_built": layers, "relative_change_vs_lr0": effect}
    (out / "recorded.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    weak = [s for s, e in effect.items() if min(e.values()) < 0.05]
    if weak:
        raise SystemExit(f"{kind}: TTT changes the logits by less than 5% in {weak}: {effect}")


RECORDING = {
    "loader": "moshi.run_inference.main() with --hf-repo naming the base (served from the local base "
              "folder), --device cpu; dtype float32",
    "forward": "LMModel.forward(codes) in training mode (chunk-parallel TTT, what the trainer optimised; "
               "no dropout in the LM), torch.no_grad, fp32, batch 1",
    "codes": {"file": "codes.safetensors", "seed": CODES_SEED, "T": CODES_T},
    "sets": {
        "as_written": {"what": "the checkpoint's learning_rate with the trainer's clip (the fork's default "
                               f"delta_clip_fro_norm {TRAINER_CLIP}, which no config key states)",
                       "ttt_overrides": {}},
        "clip_none": {"what": f"clip removed, lr {LR_CLIP_NONE} (set on the fork's TTTGating attributes "
                              "delta_clip_fro_norm and ttt_lr)",
                      "ttt_overrides": {"delta_clip_fro_norm": None, "lr": LR_CLIP_NONE}},
        "lr0": {"what": "ttt_lr 0: no update, the fast weights stay W0", "ttt_overrides": {"lr": 0.0}},
    },
    "keys": "<set>.text [1, 1, T, text_card] and <set>.audio [1, dep_q, T, card]; NaN where moshi "
            "makes no prediction (delays)"}


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(work: Path, base: Path, out: Path, commit: str, seconds: int) -> None:
    """golden.json: how the set was made (fork commit, command, settings), what each kind holds, the
    ttt overrides that reproduce each recorded setting, and a sha256 of every file."""
    import importlib.metadata as md
    common = {**train_args("ttt-only", Path("WORK"), Path("BASE")), "run_dir": "WORK/runs/<kind>"}
    kinds = {}
    for kind in KINDS:
        ckpt = checkpoint_dir(work, kind)
        folder = out / kind / ckpt.relative_to(work / "runs" / kind)
        weights = "lora.safetensors" if (folder / "lora.safetensors").exists() else "consolidated.safetensors"
        kinds[kind] = {"train_args_changed": KINDS[kind], "checkpoint": str(folder.relative_to(out)),
                       "weights": weights, "step": int(folder.parent.name.split("_")[1]),
                       "logits": f"{kind}/logits.safetensors",
                       **json.loads((out / kind / "recorded.json").read_text())}
        (out / kind / "recorded.json").unlink()
    info = {
        "what": "checkpoints written by the fine-tuning fork's own trainer and the logits of its model as its "
                "loader builds it (SPEC §4.3 Fidelity); read by tests/test_fork_golden.py",
        "fork": {"repo": "github.com/AlufRon/moshi_in_place", "commit": commit},
        "command": "scripts/make-fork-golden.sh FORK  (FORK: a checkout or bare git mirror of the fork)",
        "seconds": seconds,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     **{d: md.version(d) for d in ("fire", "simple-parsing", "tensorboard")}},
        "base": {"made_by": "ttt init-checkpoint --preset tiny --copy-base, `ttt` section and ttt.safetensors "
                            "dropped (a plain moshi checkpoint)",
                 "sha256": {f.name: sha256(f) for f in sorted(base.iterdir())},
                 "committed": ["base/config.json", "base/model.safetensors"],
                 "from_tiny_preset": ["mimi.safetensors", "mimi_config.json", "tokenizer.model"]},
        "training": {"trainer": "moshi-finetune/train.py train(config), CPU, fp32, world size 1 (gloo)",
                     "data": "12 s synthetic stereo dialogue (fork_golden.py make_data), empty alignments",
                     "common_train_args": common},
        "recording": RECORDING,
        "kinds": kinds,
        "sha256": {str(f.relative_to(out)): sha256(f) for f in sorted(out.rglob("*"))
                   if f.is_file() and f.name not in ("golden.json", "README.md")},
    }
    (out / "golden.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["data", "train", "record", "manifest"])
    p.add_argument("kind", nargs="?")
    p.add_argument("--work", type=Path)
    p.add_argument("--base", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--seconds", type=int, default=0)
    a = p.parse_args()
    if a.step == "data":
        return make_data(Path(a.kind))
    if a.step == "manifest":
        return manifest(a.work.resolve(), a.base.resolve(), a.out.resolve(), a.commit, a.seconds)
    if a.kind not in KINDS:
        p.error(f"kind must be one of {', '.join(KINDS)}")
    if a.step == "train":
        return run_trainer(a.kind, a.work.resolve(), a.base.resolve())
    return record(a.kind, a.work.resolve(), a.base.resolve(), a.out.resolve())


if __name__ == "__main__":
    main()
