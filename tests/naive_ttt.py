"""Test-side reference for In-Place TTT, written from SPEC §3.1-3.3 (never from ttt_cli): explicit
per-token loops in float64, and a moshi gating replacement that runs them inside a plain moshi model.

The plain model comes from `load_model(..., ttt=False)` (moshi's own modules); its TTT settings and
tensors are read from the checkpoint's files by `checkpoint_ttt`, not from the tool's layers.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

F64 = torch.float64


def naive_target(x0_chunk, conv_w, w_target, padding):
    """V̂ of one (possibly partial) chunk by explicit loops: V̂_t = W_target · Σ_j conv[:, :, j] · X0_{t+j-left},
    zero-padded inside the chunk only."""
    L, d = x0_chunk.shape
    K = conv_w.shape[2]
    left = 0 if padding == "right" else (K - 1) // 2
    v = torch.zeros(L, d, dtype=F64)
    for t in range(L):
        acc = torch.zeros(d, dtype=F64)
        for j in range(K):
            s = t + j - left
            if 0 <= s < L:
                acc += conv_w[:, :, j].to(F64) @ x0_chunk[s].to(F64)
        v[t] = w_target.to(F64) @ acc
    return v


def naive_delta(z_chunk, x0_chunk, conv_w, w_target, padding, clip=None, eps=1e-12):
    """Δ = V̂ᵀ Z of one chunk, summed token by token, optionally Frobenius-clipped."""
    v = naive_target(x0_chunk, conv_w, w_target, padding)
    delta = torch.zeros(v.shape[1], z_chunk.shape[1], dtype=F64)
    for s in range(z_chunk.shape[0]):
        delta += torch.outer(v[s], z_chunk[s].to(F64))
    if clip is not None:
        delta = delta * min(1.0, clip / (delta.norm().item() + eps))
    return delta


class NaiveStream:
    """One stream's fast weight and pending chunk; apply W_i to a token, update when the chunk completes."""

    def __init__(self, w0, conv_w, w_target, C, lr, padding="right", clip=None, eps=1e-12):
        self.w0 = w0.to(F64)
        self.conv_w, self.w_target = conv_w.to(F64), w_target.to(F64)
        self.C, self.lr, self.padding, self.clip, self.eps = C, lr, padding, clip, eps
        self.start()

    def start(self, w=None, pending_z=None, pending_x0=None):
        """A fresh stream from W0, or from a snapshot's W and pending rows."""
        self.w = (self.w0 if w is None else w.to(F64)).clone()
        self.zs = [r.to(F64) for r in pending_z] if pending_z is not None else []
        self.xs = [r.to(F64) for r in pending_x0] if pending_x0 is not None else []
        self.tokens = self.updates = 0

    def step(self, z, x0):
        """z [h], x0 [d] of one token -> output W z [d] (float64)."""
        out = self.w @ z.to(F64)
        self.zs.append(z.to(F64))
        self.xs.append(x0.to(F64))
        self.tokens += 1
        if len(self.zs) == self.C:
            self.flush()
        return out

    def flush(self):
        """Applies the pending (possibly partial) chunk: W += lr · clip(V̂ᵀ Z)."""
        if self.zs:
            d = naive_delta(torch.stack(self.zs), torch.stack(self.xs), self.conv_w, self.w_target, self.padding,
                            self.clip, self.eps)
            self.w = self.w + self.lr * d
            self.updates += 1
        self.zs, self.xs = [], []


def gated_z(gating, x):
    """Z = act(x W_gateᵀ) ⊙ (x W_upᵀ) from moshi's `ActivationGating` weights, in float64: [B, T, h]."""
    w_in = gating.linear_in.weight.to(F64)
    hu = F.linear(x.to(F64), w_in)
    B, T, _ = hu.shape
    hu = hu.view(B, T, 2, -1)
    return gating.activation(hu[..., 0, :]) * hu[..., 1, :]


class NaiveGating(nn.Module):
    """Replaces moshi's gating in a plain LM: batch 1, one token per call, X0 from the embedding hooks."""

    def __init__(self, gating, stream: NaiveStream, x0: dict):
        super().__init__()
        self.gating, self.stream, self.x0 = gating, stream, x0

    def forward(self, x):  # [1, T, d]
        z = gated_z(self.gating, x)[0]  # [T, h]
        x0 = self.x0["value"][0]        # [T, d]
        assert x.shape[0] == 1 and x0.shape[0] == z.shape[0]
        return torch.stack([self.stream.step(z[t], x0[t]) for t in range(z.shape[0])])[None].to(x.dtype)


def checkpoint_ttt(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the `ttt` section of config.json, the TTT tensors of its ttt file), read with safetensors directly."""
    from safetensors.torch import load_file
    cfg = json.loads((Path(directory) / "config.json").read_text())["ttt"]
    return cfg, load_file(str(Path(directory) / cfg.get("ttt_name", "ttt.safetensors")))


@contextlib.contextmanager
def naive_ttt(lm, cfg: dict, tensors: dict[str, torch.Tensor], layers=None, lr=None):
    """Installs `NaiveGating` on the TTT layers of a plain moshi LM (`load_model(..., ttt=False)`).

    X0 (SPEC §3.2): source `input` = Σ of the text and audio token embeddings, summed from forward
    hooks on moshi's embedding tables (the depformer has its own tables, so only the main
    transformer's input counts); source `text` = the text embedding alone. `tensors` missing a
    layer's `w_down` use moshi's `linear_out` (SPEC §3.6). Yields {layer: NaiveStream}; moshi's
    gating modules are put back on exit.
    """
    holder: dict = {}
    text_only = cfg.get("target_source", "input") == "text"

    def grab(_m, _a, out):
        holder["parts"] = holder.get("parts", []) + [out]

    def total(_m, _a, out):
        holder["value"] = out if text_only else sum(holder.get("parts", []))
        holder["parts"] = []

    embs = [] if text_only else list(lm.emb) + [lm.text_emb]
    hooks = [e.register_forward_hook(grab) for e in embs] + [lm.text_emb.register_forward_hook(total)]
    saved, streams = {}, {}
    layers = cfg["layers"] if layers is None else layers
    try:
        for i in layers:
            pre = f"transformer.layers.{i}.gating."
            gating = lm.transformer.layers[i].gating
            w0 = tensors.get(pre + "w_down", gating.linear_out.weight.detach())
            streams[i] = NaiveStream(w0, tensors[pre + "target_generator.conv1d.conv.weight"],
                                     tensors[pre + "target_generator.W_target.weight"], cfg["chunk_size"],
                                     cfg["lr"] if lr is None else lr, cfg.get("conv_padding", "right"),
                                     cfg.get("delta_clip_fro_norm"), cfg.get("delta_clip_epsilon", 1e-12))
            saved[i] = gating
            lm.transformer.layers[i].gating = NaiveGating(gating, streams[i], holder)
        yield streams
    finally:
        for h in hooks:
            h.remove()
        for i, g in saved.items():
            lm.transformer.layers[i].gating = g
