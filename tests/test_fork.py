"""Checkpoints of the fine-tuning fork (moshi_in_place), written here as SPEC §4.3 says its trainer writes
them, against an independent reference: plain moshi with the effective weights computed here and each
TTT layer replaced by the SPEC's math written out per token in float64 (W0 by the §4.3 rules)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ttt_cli import load_model, ttt_layers
from ttt_cli.errors import CheckpointError, ConfigError
from ttt_cli.fastweights.attach import set_ttt_lr
from ttt_cli.models.fork import from_fork_config
from ttt_cli.models.presets import LM_CONFIGS, ensure_preset, preset_dir
from test_checkpoint import codes_for, logits  # teacher-forced logits of random codes, NaN -> 0

LAYERS = [1, 3]           # start_layer 1, layer_frequency 2 on tiny's 4 layers
CHUNK, LR, RANK, SCALING = 8, 0.05, 4, 2.0
T = 80                    # > tiny's context 32: YaRN matters
STEP = 10
BF16 = torch.bfloat16


# -- the base and a fork run folder, as the trainer writes them ---------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A plain moshi-layout copy of tiny (no `ttt` section): what the fork trains from."""
    src, out = ensure_preset("tiny"), tmp_path_factory.mktemp("base")
    for f in ("model.safetensors", "mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copy(src / f, out / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("ttt")
    (out / "config.json").write_text(json.dumps(cfg))
    return out, cfg, load_file(str(out / "model.safetensors"))


def lora_module_names():
    """Every nn.Linear that moshi's LoRA wraps in the tiny LM (the trainer saves a pair for each)."""
    from moshi.models.loaders import get_moshi_lm
    from moshi.modules.lora import replace_all_linear_with_lora
    lm = get_moshi_lm(None, lm_kwargs=dict(LM_CONFIGS["tiny"]), device="meta", dtype=torch.float32)
    replace_all_linear_with_lora(lm, RANK, SCALING, device="meta")
    return sorted(k[: -len(".lora_A.weight")] for k in lm.state_dict() if k.endswith(".lora_A.weight"))


def rnd(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def write_fork(root, base, kind, form="raw", yarn=None, ttt_config=None, drop=(), seed=0):
    """RUN/checkpoints/checkpoint_000010/consolidated/ for one kind of run; bf16 tensors (param_dtype).

    kind: ttt-only | unfreeze | lora | full | merged (LoRA+TTT with save_adapters: false).
    form: raw (the base's config.json, naming files not in the folder) | builtin (LM kwargs only, as
    moshi's `loaders._lm_kwargs`). Returns (folder, the tensors written in float32).
    """
    _, base_cfg, bstate = base
    g = torch.Generator().manual_seed(seed)
    d, h = bstate["transformer.layers.1.gating.linear_out.weight"].shape
    cfg = dict(base_cfg) if form == "raw" else dict(LM_CONFIGS["tiny"])
    lora = kind in ("lora", "merged")
    cfg.update(lora=lora, lora_rank=RANK, lora_scaling=SCALING)
    cfg["ttt_config"] = ttt_config or {"enabled": True, "layer_frequency": 2, "start_layer": 1, "chunk_size": CHUNK,
                                       "learning_rate": LR, "conv_kernel_size": 2}
    if yarn:
        cfg["yarn_config"] = {"enabled": True, "original_max_seq_len": cfg["context"], "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0, **yarn}
    t = {}
    for i in LAYERS:
        p = f"transformer.layers.{i}.gating."
        t[p + "target_generator.conv1d.conv.weight"] = rnd(g, d, d, 2)
        if lora and kind == "lora":
            t[p + "target_generator.W_target.frozen_W.weight"] = rnd(g, d, d)
            t[p + "target_generator.W_target.lora_A.weight"] = rnd(g, RANK, d)
            t[p + "target_generator.W_target.lora_B.weight"] = rnd(g, d, RANK)
        else:
            t[p + "target_generator.W_target.weight"] = rnd(g, d, d)
    pairs = {}
    if lora:
        for n in lora_module_names():
            w = bstate[n + ".weight"]
            pairs[n + ".lora_A.weight"] = rnd(g, RANK, w.shape[1], std=0.05)
            pairs[n + ".lora_B.weight"] = rnd(g, w.shape[0], RANK, std=0.05)
    if kind == "ttt-only":
        name = "lora.safetensors"
    elif kind == "unfreeze":  # whole TTT layers saved: trained attention etc. and w_down
        name = "lora.safetensors"
        for i in LAYERS:
            pre = f"transformer.layers.{i}."
            t.update({k: v + rnd(g, *v.shape, std=0.02) for k, v in bstate.items() if k.startswith(pre)})
            t[pre + "gating.w_down"] = bstate[pre + "gating.linear_out.weight"] + rnd(g, d, h, std=0.05)
            t[pre + "gating.w_down_pretrained"] = bstate[pre + "gating.linear_out.weight"].clone()
    elif kind == "lora":
        name = "lora.safetensors"
        t.update(pairs)
    else:  # full fine-tuning, or save_adapters: false (every weight merged)
        name = "consolidated.safetensors"
        full = {k: v + rnd(g, *v.shape, std=0.01) if kind == "full" and v.is_floating_point() else v
                for k, v in bstate.items()}
        if kind == "merged":
            for n in lora_module_names():
                full[n + ".weight"] = merge(bstate[n + ".weight"], pairs[n + ".lora_A.weight"],
                                            pairs[n + ".lora_B.weight"])
        t.update(full)
        for i in LAYERS:
            p = f"transformer.layers.{i}.gating."
            lo = bstate[p + "linear_out.weight"]
            t[p + "w_down"] = lo + rnd(g, d, h, std=0.05) if kind == "full" else lo.clone()
            t[p + "w_down_pretrained"] = lo.clone()
    for k in drop:
        t.pop(k)
    folder = root / "run" / "checkpoints" / f"checkpoint_{STEP:06d}" / "consolidated"
    folder.mkdir(parents=True)
    bf = {k: v.to(BF16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in t.items()}
    save_file(bf, str(folder / name))
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    return folder, {k: v.float() if v.is_floating_point() else v for k, v in bf.items()}


def merge(w, a, b):
    return (w.double() + SCALING * (b.to(BF16).double() @ a.to(BF16).double())).float()


# -- the reference model ------------------------------------------------------------------------------

def gelu64(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


class RefTTT(nn.Module):
    """SPEC §3.1-3.3 per token in float64: O_t = W Z_t; after each complete chunk W += lr·clip(Σ V̂_t Z_tᵀ)."""

    def __init__(self, w_in, w0, conv, w_target, x0, lr, clip):
        super().__init__()
        self.w_in, self.w0, self.conv, self.w_target = (t.double() for t in (w_in, w0, conv, w_target))
        self.x0, self.lr, self.clip = x0, lr, clip

    def target(self, x0):  # one chunk [C, d]: right zero padding inside the chunk only
        C, K = x0.shape[0], self.conv.shape[2]
        v = torch.zeros_like(x0)
        for t in range(C):
            acc = sum(self.conv[:, :, j] @ x0[t + j] for j in range(K) if t + j < C)
            v[t] = self.w_target @ acc
        return v

    def forward(self, x):
        h = self.w_in.shape[0] // 2
        xx, x0 = x.double(), self.x0["x"].double()
        z = gelu64(xx @ self.w_in[:h].T) * (xx @ self.w_in[h:].T)  # [B, T, h]
        out = torch.zeros(*x.shape, dtype=torch.float64)
        for b in range(x.shape[0]):
            w = self.w0.clone()
            for t in range(x.shape[1]):
                out[b, t] = w @ z[b, t]
                if (t + 1) % CHUNK == 0:
                    s = t + 1 - CHUNK
                    v = self.target(x0[b, s:t + 1])
                    delta = sum(torch.outer(v[j], z[b, s + j]) for j in range(CHUNK))
                    if self.clip is not None:
                        delta = delta * min(1.0, self.clip / (delta.norm().item() + 1e-12))
                    w = w + self.lr * delta
        return out.float()


class RefRope(nn.Module):
    """Rotation of interleaved pairs in float64 with given frequencies; queries times `factor`."""

    def __init__(self, freqs, factor):
        super().__init__()
        self.freqs, self.factor = freqs.double(), factor

    def forward(self, q, k, offset, time_before_heads=False):
        assert not time_before_heads
        pos = offset.double()[:, None] + torch.arange(q.shape[2], dtype=torch.float64)  # [B, T]
        ang = pos[:, None, :, None] * self.freqs  # [B, 1, T, D/2]

        def rot(x, f):
            x = x.double().unflatten(-1, (-1, 2))
            re, im = x[..., 0], x[..., 1]
            return (torch.stack([re * ang.cos() - im * ang.sin(), re * ang.sin() + im * ang.cos()], -1)
                    * f).flatten(-2).float()
        return rot(q, self.factor), rot(k, 1.0)


def yarn_reference(head_dim, max_period, scale, L, beta_fast, beta_slow, mscale, mscale_all_dim):
    """SPEC §4.3's YaRN, evaluated in float64 and cast to float32 as specified."""
    import numpy as np
    j = np.arange(head_dim // 2, dtype=np.float64)
    f = max_period ** (-j / (head_dim // 2))
    lam = 2 * np.pi / f
    r = np.clip((lam - beta_slow * L) / (beta_fast * L - beta_slow * L), 0, 1)
    freqs = torch.from_numpy((1 - r) * f + r * f / scale).float()

    def m(x):
        return 0.1 * x * math.log(scale) + 1
    factor = 1.0 if mscale == 1.0 else (m(mscale) / m(mscale_all_dim) if mscale_all_dim > 0 else m(mscale))
    return freqs, factor


def reference_lm(state, w0, tg, yarn=None, lr=LR, clip=None):
    """Plain moshi (fp32) with `state`, each TTT layer's gating replaced by RefTTT."""
    from moshi.models.loaders import get_moshi_lm
    cfg = dict(LM_CONFIGS["tiny"])
    if yarn:
        cfg["context"] = int(cfg["context"] * yarn["scale"])
    lm = get_moshi_lm(None, lm_kwargs=cfg, device="cpu", dtype=torch.float32)
    lm.load_state_dict({k: v.float() for k, v in state.items()})
    x0 = {}
    lm.transformer.register_forward_pre_hook(lambda _m, args: x0.__setitem__("x", args[0]))  # no condition here
    for i in LAYERS:
        gating = lm.transformer.layers[i].gating
        lm.transformer.layers[i].gating = RefTTT(gating.linear_in.weight.detach(), w0[i], *tg[i], x0, lr, clip)
    if yarn:
        y = {"original_max_seq_len": LM_CONFIGS["tiny"]["context"], "beta_fast": 32, "beta_slow": 1,
             "mscale": 1.0, "mscale_all_dim": 0.0, **yarn}
        dim = cfg["dim"] // cfg["num_heads"]
        rope = RefRope(*yarn_reference(dim, cfg["max_period"], y["scale"], y["original_max_seq_len"], y["beta_fast"],
                                       y["beta_slow"], y["mscale"], y["mscale_all_dim"]))
        for layer in lm.transformer.layers:
            layer.self_attn.rope = rope
    return lm.eval()


def rel_per_position(a, b):
    """Largest relative error of one stream position (audio and text logits each), over the batch."""
    worst = 0.0
    for x, y in zip(a, b):
        num = (x - y).transpose(1, 2).flatten(2).norm(dim=-1)  # [B, T]
        worst = max(worst, (num / y.transpose(1, 2).flatten(2).norm(dim=-1).clamp_min(1e-12)).max().item())
    return worst


def effective(kind, base, t):
    """What SPEC §4.3 says each kind means: the LM weights, W0 and (conv, W_target) per TTT layer."""
    bstate = base[2]
    state = dict(bstate)
    if kind in ("full", "merged"):
        state = {k: v for k, v in t.items() if ".gating.w_down" not in k and "target_generator" not in k}
    elif kind == "unfreeze":
        state.update({k: v for k, v in t.items() if k in bstate})
    elif kind == "lora":
        for n in lora_module_names():
            state[n + ".weight"] = merge(bstate[n + ".weight"], t[n + ".lora_A.weight"], t[n + ".lora_B.weight"])
    w0, tg = {}, {}
    for i in LAYERS:
        p = f"transformer.layers.{i}.gating."
        # W0: a saved w_down, else the base linear_out -- never with the layer's linear_out LoRA delta
        w0[i] = t[p + "w_down"] if p + "w_down" in t else bstate[p + "linear_out.weight"]
        if kind == "lora":
            wt = merge(t[p + "target_generator.W_target.frozen_W.weight"], t[p + "target_generator.W_target.lora_A.weight"],
                       t[p + "target_generator.W_target.lora_B.weight"])
        else:
            wt = t[p + "target_generator.W_target.weight"]
        tg[i] = (t[p + "target_generator.conv1d.conv.weight"], wt)
    return state, w0, tg


CASES = [  # kind, config form, YaRN, which path is passed
    ("ttt-only", "raw", None, "step"),
    ("unfreeze", "builtin", {"scale": 4.0}, "consolidated"),
    ("lora", "raw", {"scale": 4.0, "mscale": 1.5, "mscale_all_dim": 0.5}, "file"),
    ("merged", "builtin", None, "consolidated"),
    ("full", "raw", {"scale": 2.0}, "step"),
]


@pytest.mark.parametrize("kind,form,yarn,path", CASES)
def test_fork_kinds_match_the_spec_reference(tmp_path, base, kind, form, yarn, path):
    folder, t = write_fork(tmp_path, base, kind, form, yarn)
    source = {"consolidated": folder, "step": folder.parent,
              "file": folder / ("lora.safetensors" if (folder / "lora.safetensors").exists()
                                else "consolidated.safetensors")}[path]
    m = load_model(str(source), base=str(base[0]), device="cpu", dtype="fp32", ttt={"delta_clip_fro_norm": None})
    assert m.ttt.layers == LAYERS and m.ttt.activation == "gelu" and m.ttt.target_source == "input"
    assert all(l.w_down.dtype == torch.float32 for l in ttt_layers(m.lm).values())  # bf16 upcast
    ref = reference_lm(*effective(kind, base, t), yarn=yarn)
    c = codes_for(m.lm, T=T, seed=1)
    got = logits(m.lm, c)
    err = rel_per_position(got, logits(ref, c))
    assert err <= 1e-4, f"{kind}: max relative error per position {err:.2e}"
    set_ttt_lr(m.lm, 0.0)
    assert rel_per_position(logits(m.lm, c), got) > 1e-2  # TTT visibly changes the logits
    prov = m.config["provenance"]
    assert prov["format"] == "moshi_in_place" and prov["step"] == STEP
    lm_from = prov["from"]["moshi"]
    assert lm_from.startswith("checkpoint") if kind in ("full", "merged") else lm_from.startswith("base")
    assert prov["from"]["tokenizer"].startswith("base") and prov["files"]["tokenizer"].startswith(str(base[0]))
    if yarn:
        assert prov["yarn"]["replaced_rope"] and m.lm.transformer.layers[0].self_attn.context == int(32 * yarn["scale"])


def test_trainer_clip_is_reproduced_and_warned_once(tmp_path, base):
    """No clip key: the fork's 1e-5 applies (lr large enough here that the clipped update still shows)."""
    folder, t = write_fork(tmp_path, base, "ttt-only", ttt_config={"enabled": True, "layer_frequency": 2,
                                                                    "start_layer": 1, "chunk_size": CHUNK,
                                                                    "learning_rate": 2e3})
    with pytest.warns(UserWarning, match="--ttt-clip none") as rec:
        m = load_model(str(folder), base=str(base[0]), device="cpu", dtype="fp32")
    assert sum("--ttt-clip" in str(w.message) for w in rec) == 1 and len(m.warnings) == 1
    assert m.ttt.delta_clip_fro_norm == 1e-5 and m.config["provenance"]["mapping"]["clip_defaulted"]
    state, w0, tg = effective("ttt-only", base, t)
    c = codes_for(m.lm, T=T, seed=1)
    got = logits(m.lm, c)
    assert rel_per_position(got, logits(reference_lm(state, w0, tg, lr=2e3, clip=1e-5), c)) <= 1e-4
    assert rel_per_position(got, logits(reference_lm(state, w0, tg, lr=2e3, clip=None), c)) > 1e-2


def test_fork_config_mapping():
    cfg = from_fork_config({"ttt_config": {}}, 32)
    c = cfg.config
    assert c.layers == [0, 6, 12, 18, 24, 30] and c.chunk_size == 256 and c.lr == 1e-3 and c.conv_kernel_size == 2
    assert c.delta_clip_fro_norm == 1e-5 and cfg.clip_defaulted and c.delta_clip_epsilon == 1e-12
    assert (c.activation, c.target_source, c.conv_padding) == ("gelu", "input", "right")
    for clip in (None, 0, -1.0):  # the fork: null or <= 0 means no clip
        m = from_fork_config({"ttt_config": {"delta_clip_fro_norm": clip}}, 32)
        assert m.config.delta_clip_fro_norm is None and not m.clip_defaulted
    assert from_fork_config({"ttt_config": {"delta_clip_fro_norm": 0.5}}, 32).config.delta_clip_fro_norm == 0.5
    fb = from_fork_config({"lora": True}, 32, adapters=True)  # its inference's fallback
    assert fb.config.layers == [10, 20, 30] and fb.config.chunk_size == 256 and "fallback" in fb.source
    assert from_fork_config({"lora": False}, 32).config is None  # consolidated without ttt_config: plain
    assert from_fork_config({"ttt_config": {"enabled": False}}, 32).config is None
    with pytest.raises(ConfigError, match="Valid keys"):
        from_fork_config({"ttt_config": {"chunksize": 3}}, 32)


def test_missing_target_tensors_warn_once_and_start_at_zero(tmp_path, base):
    p = "transformer.layers.3.gating.target_generator."
    folder, _ = write_fork(tmp_path, base, "ttt-only", drop=[p + "conv1d.conv.weight", p + "W_target.weight"])
    with pytest.warns(UserWarning) as rec:
        m = load_model(str(folder), base=str(base[0]), device="cpu", dtype="fp32", ttt={"delta_clip_fro_norm": None})
    missing = [str(w.message) for w in rec if "lacks TTT tensors" in str(w.message)]
    assert len(missing) == 1 and p + "conv1d.conv.weight" in missing[0] and p + "W_target.weight" in missing[0]
    layer = ttt_layers(m.lm)[3]
    assert not layer.target_generator.W_target.weight.any() and not layer.target_generator.conv1d.conv.weight.any()
    assert m.config["provenance"]["ttt_tensors"]["target"][p + "W_target.weight"] == "initialised (zero)"


def _expect(tmp_path, base, match, exc=CheckpointError, source=None, **kw):
    folder, _ = write_fork(tmp_path, base, **kw)
    with pytest.raises(exc, match=match):
        load_model(str(source(folder) if source else folder), base=str(base[0]), device="cpu", dtype="fp32")


def test_run_folders_are_refused_with_the_steps_and_the_path(tmp_path, base):
    folder, _ = write_fork(tmp_path, base, "ttt-only")
    (folder.parents[1] / "checkpoint_000020" / "consolidated").mkdir(parents=True)
    run = folder.parents[2]
    for p in (run, run / "checkpoints"):
        with pytest.raises(CheckpointError, match=r"step\(s\) 10, 20\. Pass one checkpoint.*"
                                                  r"checkpoint_000020/consolidated"):
            load_model(str(p), base=str(base[0]), device="cpu")


def test_inconsistent_checkpoints_are_refused(tmp_path, base):
    lora_a = [k for k in write_fork(tmp_path / "a", base, "lora")[1] if ".lora_" in k and "target_generator" not in k]
    _expect(tmp_path / "b", base, r"lora\.safetensors: config.json says lora: true but the file holds no LoRA "
                                  r"tensors", kind="lora", drop=lora_a)
    _expect(tmp_path / "c", base, r"selects TTT layers from 10 every 2, but the base model has 4 layers.*--base",
            kind="ttt-only", ttt_config={"start_layer": 10, "layer_frequency": 2})
    _expect(tmp_path / "d", base, r"TTT tensors for layer\(s\) \[3\].*does not select \(layers \[1\]\)",
            kind="ttt-only", ttt_config={"start_layer": 1, "layer_frequency": 4})


def test_bad_tensors_are_refused_naming_file_and_key(tmp_path, base):
    key = "transformer.layers.1.gating.w_down"
    for name, value, match in [("nan", torch.full((64, 176), float("nan")), "non-finite"),
                               ("shape", torch.zeros(3, 5), r"shape \(3, 5\).*needs \(64, 176\)"),
                               ("dtype", torch.zeros(64, 176, dtype=torch.int32), "dtype torch.int32")]:
        folder, t = write_fork(tmp_path / name, base, "full")
        t[key] = value
        save_file({k: v.to(BF16) if v.is_floating_point() else v for k, v in t.items()},
                  str(folder / "consolidated.safetensors"))
        with pytest.raises(CheckpointError, match=rf"consolidated\.safetensors: TTT tensor {key} .*{match}"):
            load_model(str(folder), base=str(base[0]), device="cpu")
    # our own layout too: a w_down holding NaN is refused at load (exit 2), not at the first update
    ours = tmp_path / "ours"
    shutil.copytree(preset_dir("tiny"), ours)
    tt = load_file(str(ours / "ttt.safetensors"))
    tt[key][0, 0] = float("inf")
    save_file(tt, str(ours / "ttt.safetensors"))
    with pytest.raises(CheckpointError, match=rf"ttt\.safetensors: TTT tensor {key} holds non-finite"):
        load_model(str(ours), device="cpu")


def test_base_option_only_for_fork_checkpoints(base):
    with pytest.raises(ConfigError, match="--base .* is not one"):
        load_model("tiny", base=str(base[0]), device="cpu")


def test_input_target_source_is_the_embeddings_without_condition(tiny):
    """§3.2: a condition added to the transformer input must not reach the TTT target."""
    lm = tiny.lm
    layer = ttt_layers(lm)[1]
    seen = {}
    orig = layer._x0.get
    layer._x0.get = lambda src, B, T: seen.setdefault("x0", orig(src, B, T))
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 64, (1, lm.num_codebooks, 5), generator=g)
    cond = torch.randn(1, 1, lm.dim, generator=g)
    try:
        with torch.no_grad():
            lm.forward_text(seq, sum_condition=cond)
            # the SPEC's definition: audio embeddings summed in codebook order, then the text embedding
            x0 = lm.emb[0](seq[:, 1])
            for cb in range(1, lm.num_audio_codebooks):
                x0 = x0 + lm.emb[cb](seq[:, cb + 1])
            x0 = x0 + lm.text_emb(seq[:, 0])
    finally:
        layer._x0.get = orig
    assert torch.equal(seen["x0"], x0)


def test_cli_fork_checkpoint_with_base_and_ttt_clip(tmp_path, base):
    import sphn
    from typer.testing import CliRunner
    from ttt_cli.cli.app import app
    folder, _ = write_fork(tmp_path, base, "ttt-only")
    clip = tmp_path / "clip.wav"
    sphn.write_wav(str(clip), (torch.randn(1, 24000, generator=torch.Generator().manual_seed(0)) * 0.1).numpy(), 24000)
    run = CliRunner().invoke
    r = run(app, ["infer", str(clip), "--model", str(folder.parent), "--base", str(base[0]), "--ttt-clip", "none",
                  "--greedy", "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"][0]
    assert res["ttt"]["config"]["delta_clip_fro_norm"] is None and res["ttt"]["config"]["activation"] == "gelu"
    prov = res["model"]["provenance"]
    assert prov["kind"] == "adapters" and prov["files"]["adapters"].endswith("lora.safetensors")
    assert prov["ttt_tensors"]["w0"]["1"] == "linear_out" and not prov["warnings"]
    r = run(app, ["infer", str(clip), "--model", str(folder), "--base", str(base[0]), "--ttt-clip", "0",
                  "--out", str(tmp_path / "out2")])
    assert r.exit_code == 2 and "--ttt-clip 0: expected `none` or a number > 0" in r.output
    r = run(app, ["infer", str(clip), "--model", str(folder.parents[2]), "--base", str(base[0]),
                  "--out", str(tmp_path / "out3")])
    assert r.exit_code == 2 and "checkpoint_000010/consolidated" in r.output


# -- folders as the trainer leaves them, and as a moshi user edits them (SPEC §4.3) ---------------------

BASE_FILES = ("model.safetensors", "mimi.safetensors", "mimi_config.json", "tokenizer.model")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub: offline mode and an empty hub cache, so that any attempt to fetch a base fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def trainer_folder(root, base, kind, edit=None, **kw):
    """A run trained from a local base: its config.json is the base's raw one (naming model.safetensors,
    mimi.safetensors, tokenizer.model, mimi_config.json) and the base's files lie beside it in consolidated/,
    as moshi's own loader needs them; `edit`: keys a moshi user adds to config.json."""
    folder, t = write_fork(root, base, kind, "raw", **kw)
    for f in BASE_FILES:
        shutil.copyfile(base[0] / f, folder / f)
    if edit:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **edit}, indent=4))
    return folder, t


COMPLETE = [  # kind, which path is passed, keys a moshi user added
    ("ttt-only", "consolidated", None),
    ("lora", "file", None),
    ("full", "step", None),
    ("ttt-only", "step", {"lora_name": "lora.safetensors"}),
    ("lora", "consolidated", {"lora_name": "lora.safetensors"}),
    ("full", "consolidated", {"moshi_name": "consolidated.safetensors"}),
]


@pytest.mark.parametrize("kind,path,edit", COMPLETE)
def test_trainer_folder_with_its_base_files_loads_offline(tmp_path, base, offline, kind, path, edit):
    """Every file the config names is in the folder: no base is resolved (the hub is unreachable here), each
    file comes from the folder, full fine-tuning's LM weights from consolidated.safetensors whatever
    moshi_name says, and the TTT tensors are found whatever file keys were added (no zero-init warning)."""
    import warnings
    folder, t = trainer_folder(tmp_path, base, kind, edit)
    weights = folder / ("consolidated.safetensors" if kind == "full" else "lora.safetensors")
    source = {"consolidated": folder, "step": folder.parent, "file": weights}[path]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m = load_model(str(source), device="cpu", dtype="fp32", ttt={"delta_clip_fro_norm": None})
    assert not [str(w.message) for w in rec if "lacks TTT tensors" in str(w.message)] and not m.warnings
    prov = m.config["provenance"]
    assert prov["format"] == "moshi_in_place" and prov["base"] is None and m.ttt.layers == LAYERS
    assert prov["from"] == {"moshi": "checkpoint (consolidated.safetensors)" if kind == "full" else "checkpoint folder",
                            "mimi": "checkpoint folder", "tokenizer": "checkpoint folder",
                            "mimi_config": "checkpoint folder"}
    assert prov["files"]["tokenizer"] == str(folder.resolve() / "tokenizer.model")
    assert prov["files"]["lm_weights"] == str((weights if kind == "full" else folder / "model.safetensors").resolve())
    c = codes_for(m.lm, T=T, seed=1)
    got = logits(m.lm, c)
    err = rel_per_position(got, logits(reference_lm(*effective(kind, base, t)), c))
    assert err <= 1e-4, f"{kind} {edit}: max relative error per position {err:.2e}"
    # the same checkpoint loaded the `--base` way, with the base files only in the base folder
    for f in BASE_FILES:
        (folder / f).unlink()
    if edit:
        write = json.loads((folder / "config.json").read_text())
        write = {k: v for k, v in write.items() if k not in edit}
        (folder / "config.json").write_text(json.dumps(write))
    via_base = load_model(str(source), base=str(base[0]), device="cpu", dtype="fp32", ttt={"delta_clip_fro_norm": None})
    assert via_base.config["provenance"]["from"]["tokenizer"] == f"base {base[0]}"
    assert rel_per_position(got, logits(via_base.lm, c)) <= 1e-6


def test_a_folder_that_lacks_a_file_says_which_and_where_it_looked(tmp_path, base, offline):
    folder, _ = trainer_folder(tmp_path, base, "ttt-only")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError) as e:  # the default base is on the hub, which is unreachable here
        load_model(str(folder), device="cpu")
    msg = str(e.value)
    lacks = msg.split(" whose folder lacks ", 1)[1].split(". What it lacks comes from its base (--base")[0]
    assert lacks == f"the tokenizer (`tokenizer_name`: tokenizer.model; looked for {folder.resolve() / 'tokenizer.model'})"
    m = load_model(str(folder), base=str(base[0]), device="cpu", dtype="fp32",  # only the tokenizer from the base
                   ttt={"delta_clip_fro_norm": None})
    assert m.config["provenance"]["from"] == {"moshi": "checkpoint folder", "mimi": "checkpoint folder",
                                              "tokenizer": f"base {base[0]}", "mimi_config": "checkpoint folder"}
    assert m.config["provenance"]["files"]["tokenizer"] == str(base[0] / "tokenizer.model")
    assert "tokenizer from base" in m.notes[0]
    # the author's configs name no file at all: everything but the trainer's file comes from the base
    builtin, _ = write_fork(tmp_path / "builtin", base, "ttt-only", "builtin")
    with pytest.raises(CheckpointError, match=r"lacks the LM weights \(config.json names no `moshi_name`\); the "
                                              r"Mimi weights \(config.json names no `mimi_name`\); the tokenizer"):
        load_model(str(builtin), device="cpu")


def test_base_given_for_a_complete_folder_is_not_used_and_said_so(tmp_path, base, offline):
    folder, _ = trainer_folder(tmp_path, base, "ttt-only")
    m = load_model(str(folder), base="org/never-fetched", device="cpu", dtype="fp32", ttt={"delta_clip_fro_norm": None})
    assert m.config["provenance"]["base"] is None
    assert "--base org/never-fetched was not used" in m.notes[0]


def test_cli_infer_on_a_complete_trainer_folder_offline(tmp_path, base, offline):
    from typer.testing import CliRunner
    from safety_helpers import clip
    from ttt_cli.cli.app import app
    folder, _ = trainer_folder(tmp_path, base, "lora", {"lora_name": "lora.safetensors"})
    wav = clip(tmp_path / "a.wav", seconds=1.0)
    r = CliRunner().invoke(app, ["infer", str(wav), "--model", str(folder), "--greedy", "--out", str(tmp_path / "out"),
                                 "--ttt-clip", "none", "--json"])
    assert r.exit_code == 0, r.output
    prov = json.loads(r.stdout)["results"][0]["model"]["provenance"]
    assert prov["format"] == "moshi_in_place" and prov["base"] is None and not prov["warnings"]
    assert set(prov["from"].values()) == {"checkpoint folder"}


def test_named_files_are_looked_for_in_the_folder_first(tmp_path, base):
    """A config naming absolute paths of another machine: the folder's copies are used; a file neither in the
    folder nor at its path is missing, and the message says both places."""
    from ttt_cli.models.fork import find_fork_layout, folder_files
    folder, _ = trainer_folder(tmp_path, base, "ttt-only")
    (folder / "mimi.safetensors").unlink()
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(moshi_name="/elsewhere/model.safetensors", mimi_name=f"file://{base[0] / 'mimi.safetensors'}",
               tokenizer_name="/elsewhere/tokenizer.model", mimi_config_name="/elsewhere/mimi_config.json")
    files = folder_files(cfg, find_fork_layout(folder))
    assert files.found == {"moshi": (folder / "model.safetensors", "checkpoint folder"),
                           "mimi": (base[0] / "mimi.safetensors", "the path config.json names"),
                           "tokenizer": (folder / "tokenizer.model", "checkpoint folder"),
                           "mimi_config": (folder / "mimi_config.json", "checkpoint folder")}
    (folder / "tokenizer.model").unlink()
    assert folder_files(cfg, find_fork_layout(folder)).missing == [
        f"the tokenizer (`tokenizer_name`: /elsewhere/tokenizer.model; looked for {folder / 'tokenizer.model'} and "
        f"/elsewhere/tokenizer.model)"]
