"""Built-in offline checkpoints (`tiny`, `tiny-stt`, `tiny-mlp`, `tiny-adapter`, `bench`): deterministic moshi files
made on first use; `moshi-7b-random`, `moshi-7b-layer`: Moshi 7B's shapes, random LM weights built in memory."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from moshi.models.loaders import _lm_kwargs, get_mimi, get_moshi_lm
from safetensors.torch import save_file

from ..errors import ConfigError
from ..fastweights.config import FastWeightConfig
from ..io import atomic_dir
from .writer import add_ttt_to_checkpoint, ttt_tensors_for

PRESETS = ("tiny", "tiny-stt", "tiny-mlp", "tiny-adapter", "bench", "moshi-7b-random", "moshi-7b-layer")
# Real-shape presets (SPEC §8.7): moshi 7B's own config (moshi's `loaders._lm_kwargs`), LM weights drawn at load
# time on the target device (never written: 15-30 GB), Mimi and tokenizer files borrowed from `tiny` (small).
RANDOM_PRESETS = {"moshi-7b-random": {}, "moshi-7b-layer": {"num_layers": 1}}
HEADROOM = 1.2  # the estimate's margin: activations, caches, allocator
PRESET_VERSION = 3  # bump when a preset's files change, so caches are rebuilt
SEED = 1234

_MOSHI_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

# A small Mimi with the real one's structure (SEANet, split RVQ, 250-step encoder transformer).
TINY_MIMI_CONFIG = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 32, "causal": True, "n_filters": 4, "n_residual_layers": 1,
               "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
               "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
               "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True},
    "quantizer": {"dimension": 16, "n_q": 8, "bins": 64, "input_dimension": 32, "output_dimension": 32},
    "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 1, "causal": True, "layer_scale": 0.01,
                    "context": 250, "conv_layout": True, "max_period": 10000, "gating": "none",
                    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 64,
                    "input_dimension": 32, "output_dimensions": [32]},
}

_COMMON_LM = {
    "card": 64, "causal": True, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "layer_scale": None, "existing_text_padding_id": 3,
    "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "depformer_layer_scale": None,
}

LM_CONFIGS = {
    # attention context 32 steps = 2.56 s, so beyond-context behaviour shows on seconds of audio.
    "tiny": {**_COMMON_LM, "dim": 64, "num_heads": 4, "num_layers": 4, "hidden_scale": 4.125,
             "context": 32, "text_card": 128, "n_q": 16, "dep_q": 8, "delays": _MOSHI_DELAYS,
             "depformer_dim": 32, "depformer_dim_feedforward": 64, "depformer_num_heads": 2,
             "depformer_num_layers": 1},
    "tiny-stt": {**_COMMON_LM, "dim": 64, "num_heads": 4, "num_layers": 4, "hidden_scale": 4.125,
                 "context": 32, "text_card": 128, "n_q": 8, "dep_q": 0, "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1],
                 "depformer_dim": 32, "depformer_num_heads": 2, "depformer_num_layers": 1},
    # §8 bench shape: d = 512, 8 layers, 2 TTT layers, chunk 256.
    "bench": {**_COMMON_LM, "dim": 512, "num_heads": 8, "num_layers": 8, "hidden_scale": 4.125,
              "context": 750, "text_card": 128, "n_q": 16, "dep_q": 8, "delays": _MOSHI_DELAYS,
              "depformer_dim": 256, "depformer_dim_feedforward": 512, "depformer_num_heads": 4,
              "depformer_num_layers": 2},
}

# Presets that share another's base model files (same LM, Mimi, tokenizer) with another TTT variant.
BASES = {"tiny-mlp": "tiny", "tiny-adapter": "tiny"}

TTT_SECTIONS = {
    "tiny": {"layers": [1, 3], "chunk_size": 16, "lr": 0.05},
    # Variants (SPEC §4.1): random fast-weight tensors large enough that TTT visibly changes the text
    # logits on a few mini-batches (see VARIANT_TENSOR_STD).
    "tiny-mlp": {"variant": "mlp", "layers": [1, 3], "chunk_size": 8, "base_lr": 4.0},
    "tiny-adapter": {"variant": "linear-adapter", "layers": [1, 3], "chunk_size": 8, "rank": 16, "lr_scale": 4.0},
    "tiny-stt": {"layers": [1, 3], "chunk_size": 16, "lr": 0.05},
    "bench": {"layers": [2, 5], "chunk_size": 256, "lr": 1e-3},
    # SPEC §4.1's default for Moshi 7B: every 6th layer from 0, chunk 512; §3.6 init (no ttt file).
    "moshi-7b-random": {"layers": [0, 6, 12, 18, 24, 30], "chunk_size": 512, "lr": 1e-3},
    "moshi-7b-layer": {"layers": [0], "chunk_size": 512, "lr": 1e-3},
}

# Tensors of the variant presets redrawn ~ normal(0, std) (by name suffix) after the documented fresh init,
# so that the random tiny model shows TTT: a fresh `mlp` block is nearly silent (α = 0.05) and a fresh
# adapter exactly silent (Wo = 0).
VARIANT_TENSOR_STD = {
    "tiny-mlp": {"W1": 0.3, "W2": 0.3, "wo.weight": 0.1, "gating_alpha": 0.5},
    "tiny-adapter": {"ttt_adapter.wo": 0.1, "ttt_adapter.W1": 0.3},
}

STT_CONFIG = {"audio_silence_prefix_seconds": 0.5, "audio_delay_seconds": 0.5}


def cache_root() -> Path:
    base = os.environ.get("TTT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ttt")
    return Path(base)


def preset_dir(name: str) -> Path:
    return cache_root() / "presets" / f"{name}-v{PRESET_VERSION}"


def _corpus() -> str:
    return (Path(__file__).parent.parent / "data" / "tokenizer_corpus.txt").read_text()


def _train_tokenizer(out: Path, vocab: int) -> None:
    # One thread, a fixed seed, and sentences from memory (a file input would store its temporary
    # path in the model) keep the model file byte-identical run to run.
    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus().splitlines()), model_writer=model, vocab_size=vocab,
        model_type="unigram", character_coverage=1.0, num_threads=1, pad_id=3, unk_id=1,
        bos_id=-1, eos_id=2, user_defined_symbols=["<epad>"], minloglevel=2,
        hard_vocab_limit=True, shuffle_input_sentence=False)
    out.write_bytes(model.getvalue())


def _fit_codebooks(mimi, seconds: int = 20) -> None:
    """Gives a random Mimi's RVQ codebooks real entries: residual latents of fixed noise + chirp audio.

    A freshly built Mimi has all-zero codebooks, so every input would encode to code 0 and the
    tiny model's output would not depend on its input at all. Seeding each codebook with latents
    (the usual k-means start) makes codes follow the audio. Uses the global torch RNG (seeded).
    """
    n = seconds * 24000
    t = torch.arange(n) / 24000
    env = 0.05 + 0.3 * torch.sin(2 * math.pi * 0.7 * t).abs()
    audio = torch.randn(n) * env + 0.2 * torch.sin(2 * math.pi * (100 + 150 * t) * t)
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(audio[None, None])  # [1, C, F]
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)  # [1, D, F]
            for layer in rvq.vq.layers:
                cb = layer._codebook
                pick = torch.randperm(residual.shape[-1])[:cb.embedding_sum.shape[0]]
                cb.embedding_sum.copy_(residual[0, :, pick].T)
                cb.cluster_usage.fill_(1.0)
                cb._initialized.fill_(1.0)
                cb._embedding = None
                residual = residual - layer.decode(layer.encode(residual))


def _write_base(name: str, out: Path):
    """Writes a plain moshi checkpoint directory (no TTT) for preset `name`; returns its LMModel."""
    cfg = LM_CONFIGS[BASES.get(name, name)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        mimi = get_mimi(None, TINY_MIMI_CONFIG, device="cpu", num_codebooks=8)
        _fit_codebooks(mimi)
        save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / "mimi.safetensors"))
        lm = get_moshi_lm(None, lm_kwargs=cfg, device="cpu", dtype=torch.float32)
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / "model.safetensors"))
    _train_tokenizer(out / "tokenizer.model", cfg["text_card"])
    (out / "mimi_config.json").write_text(json.dumps(TINY_MIMI_CONFIG, indent=2))
    config = {**cfg, "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
              "tokenizer_name": "tokenizer.model", "mimi_config_name": "mimi_config.json",
              "model_type": "stt" if name == "tiny-stt" else "moshi",
              "lm_gen_config": {"temp": 0.8, "temp_text": 0.7, "top_k": 50, "top_k_text": 25}}
    if name == "tiny-stt":
        config["stt_config"] = STT_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return lm


def _variant_tensors(name: str, lm, section: dict) -> dict | None:
    """The TTT tensors of a variant preset: the fresh init with VARIANT_TENSOR_STD's tensors redrawn."""
    stds = VARIANT_TENSOR_STD.get(name)
    if stds is None:
        return None
    cfg = FastWeightConfig.from_dict(section)
    tensors = ttt_tensors_for(lm, cfg, "ntp")
    g = torch.Generator().manual_seed(SEED)
    for key in sorted(tensors):
        std = next((v for suffix, v in stds.items() if key.endswith("." + suffix)), None)
        if std is not None:
            tensors[key] = torch.empty(tensors[key].shape).normal_(0.0, std, generator=g)
    return tensors


def random_lm_config(name: str) -> dict:
    """The LMModel config of a real-shape preset: moshi 7B's `_lm_kwargs` with the preset's changes."""
    return {**_lm_kwargs, **RANDOM_PRESETS[name]}


def _write_random_preset(name: str, out: Path) -> None:
    """config.json (moshi 7B + `ttt` + `random_weights`) and tiny's Mimi and tokenizer; no LM weights file."""
    tiny = ensure_preset("tiny")
    for f in ("mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copyfile(tiny / f, out / f)
    config = {**random_lm_config(name), "mimi_name": "mimi.safetensors", "tokenizer_name": "tokenizer.model",
              "mimi_config_name": "mimi_config.json", "model_type": "moshi",
              "random_weights": {"seed": SEED, "note": "LM weights are drawn at load time (moshi's init), never stored; "
                                 "Mimi and tokenizer are tiny's: for benchmarks, not for listening"},
              "ttt": TTT_SECTIONS[name]}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def memory_estimate(lm_meta, dtype, ttt_layers: dict, streams: int = 1) -> tuple[int, str]:
    """Bytes a random-weights model needs (SPEC §8.7): LM weights in the run dtype + TTT tensors (float32) +
    `streams` streams' fast-weight state, times HEADROOM; and that arithmetic in words.

    Args:
        lm_meta: the LM with TTT attached, on the meta device.
        dtype: the run's torch dtype.
        ttt_layers: {index: fast-weight layer} of `lm_meta`.
    """
    ttt_ids = {id(t) for layer in ttt_layers.values() for t in list(layer.parameters()) + list(layer.buffers())
               if t.dtype == torch.float32 and not any(t is p for p in _base_params(layer))}
    base = sum(p.numel() for p in lm_meta.parameters() if id(p) not in ttt_ids)
    fp32 = sum(t.numel() for layer in ttt_layers.values() for t in list(layer.parameters()) + list(layer.buffers())
               if id(t) in ttt_ids)
    item = torch.tensor([], dtype=dtype).element_size()
    state = streams * sum(layer.state_bytes_per_stream() for layer in ttt_layers.values())
    total = int(HEADROOM * (base * item + fp32 * 4 + state))
    words = (f"({base / 1e9:.2f}e9 LM weights x {item} B ({str(dtype).replace('torch.', '')}) + {fp32 / 1e6:.0f}e6 "
             f"TTT tensors x 4 B + {streams} stream(s) x {state / streams / 2**30:.2f} GiB fast-weight state) x "
             f"{HEADROOM} headroom = {total / 2**30:.1f} GiB")
    return total, words


def _base_params(layer) -> list:
    """The moshi parameters a fast-weight layer reuses (In-Place keeps moshi's linears as children)."""
    return [p for name in ("linear_in", "linear_out") if hasattr(layer, name)
            for p in getattr(layer, name).parameters()]


def device_memory(device: str) -> int:
    """Total memory of `device` in bytes (a CUDA device's, else the machine's RAM)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_preset(name: str, out: Path) -> None:
    """Writes preset `name` (moshi files + `ttt` section + ttt.safetensors) into directory `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if name in RANDOM_PRESETS:
        return _write_random_preset(name, out)
    lm = _write_base(name, out)
    section = TTT_SECTIONS[name]
    add_ttt_to_checkpoint(out, section, lm, target_init="ntp", tensors=_variant_tensors(name, lm, section))


def ensure_preset(name: str) -> Path:
    """Returns the cached preset directory, building it on first use (atomically)."""
    if name not in PRESETS:
        raise ValueError(name)
    final = preset_dir(name)
    if (final / "config.json").exists():
        return final
    try:
        with atomic_dir(final) as tmp:  # the user's umask (mkdtemp would make it 0700)
            build_preset(name, tmp)
    except OSError as e:
        if not (final / "config.json").exists():
            raise ConfigError(_cache_problem(name, e), hint="set TTT_CACHE to a directory you may write") from None
        # another process won the race: its preset is the same
    return final


def _cache_problem(name: str, e: OSError) -> str:
    """An unwritable cache is the run's setup, not a failed input (exit 2): name the variable and the path."""
    env = os.environ.get("TTT_CACHE")
    where = (f"TTT_CACHE={env}" if env else
             f"{cache_root()} (the default when TTT_CACHE is not set: $XDG_CACHE_HOME/ttt or ~/.cache/ttt)")
    return (f"preset {name} is built on first use in the cache, and the cache {where} cannot be written "
            f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}). Set TTT_CACHE to a directory you "
            f"may write (e.g. TTT_CACHE=$HOME/ttt-cache), or make that one writable, and run again.")


def directory_digest(path: Path) -> str:
    """sha256 over the files of a checkpoint directory (names and bytes), for determinism checks."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()
