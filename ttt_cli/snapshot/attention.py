"""The attention side of a snapshot: moshi's other streaming states (KV caches, offsets) of one stream."""

from __future__ import annotations

import dataclasses
import typing as tp

import torch
from torch import nn

from moshi.modules.streaming import State
from moshi.modules.transformer import RingKVCache

from ..errors import StateMismatchError
from ..fastweights.interface import FastWeightLayer
from .format import ATTN_PREFIX, FastWeightState

# moshi State fields that are not stream content.
SKIP_FIELDS = ("batch_size", "device", "exec_mask")


def streaming_states(lm: nn.Module) -> dict[str, tuple[nn.Module, State]]:
    """The LM's streaming states other than the fast-weight layers', by qualified module name ('' = the LM),
    each with its module (moshi's `get_streaming_state`; modules not streaming now are left out).

    Args:
        lm: a moshi LMModel.
    """
    modules = dict(lm.named_modules())
    return {n: (modules[n], st) for n, st in lm.get_streaming_state().items()
            if st is not None and not isinstance(modules[n], FastWeightLayer)}


def _ring_positions(end: int, n: int, capacity: int) -> torch.Tensor:
    # Ring slot of each of the last n positions, oldest first (RingKVCache writes position p at p % capacity).
    return torch.arange(end - n, end, dtype=torch.long) % capacity


def capture_attention(lm: nn.Module, b: int) -> tuple[dict[str, torch.Tensor], dict[str, tp.Any]]:
    """Every non-TTT streaming state of batch item b (attention KV caches, offsets), capacity-independent.

    Args:
        lm: a streaming moshi LMModel.
        b: which stream of the batch.
    Returns:
        (tensors `attention.{module}.{field}[.keys|.values]`, the `attention_state` metadata describing them).
    """
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, tp.Any] = {}
    for name, (_, st) in streaming_states(lm).items():
        fields: dict[str, tp.Any] = {}
        for f in dataclasses.fields(st):
            if f.name in SKIP_FIELDS:
                continue
            v = getattr(st, f.name)
            key = f"{ATTN_PREFIX}{name}.{f.name}"
            if isinstance(v, RingKVCache):
                end = int(v.end_offset[b if v.respect_exec_mask else 0])
                n = min(end, v.capacity)
                idx = _ring_positions(end, n, v.capacity).to(v.cache.device)
                tensors[key + ".keys"] = v.cache[0, b].index_select(1, idx).detach().cpu().contiguous()  # [H, n, D]
                tensors[key + ".values"] = v.cache[1, b].index_select(1, idx).detach().cpu().contiguous()
                fields[f.name] = {"kind": "ring", "end_offset": end, "capacity": v.capacity,
                                  "shared_offset": not v.respect_exec_mask}
            elif isinstance(v, torch.Tensor):
                batched = v.dim() >= 1 and v.shape[0] == st.batch_size
                tensors[key] = (v[b] if batched else v).detach().cpu().clone().contiguous()
                fields[f.name] = {"kind": "batch" if batched else "shared"}
            elif v is None or isinstance(v, (bool, int, float, str)):
                fields[f.name] = {"kind": "value", "value": v}
            else:
                raise StateMismatchError(f"cannot capture the streaming state of {name or 'the LM'}: field "
                                         f"{f.name} is a {type(v).__name__}.")
        spec[name] = {"type": type(st).__name__, "fields": fields}
    return tensors, spec


def restore_attention(lm: nn.Module, s: FastWeightState, b: int) -> None:
    """Puts a snapshot's attention state into stream b; checks everything first, so a refused restore changes
    nothing (StateMismatchError says why).

    Args:
        lm: a streaming moshi LMModel.
        s: an `attention=True` snapshot.
        b: which stream to overwrite.
    """
    for st, fname, fs, key, cur in _restore_plan(lm, s, b):
        if fs["kind"] == "ring":
            assert isinstance(cur, RingKVCache)
            end, k, v = fs["end_offset"], s.tensors[key + ".keys"], s.tensors[key + ".values"]
            n = min(k.shape[1], cur.capacity)
            idx = _ring_positions(end, n, cur.capacity).to(cur.cache.device)
            cur.cache[:, b].zero_()
            cur.cache[0, b].index_copy_(1, idx, k[:, k.shape[1] - n:].to(cur.cache))
            cur.cache[1, b].index_copy_(1, idx, v[:, v.shape[1] - n:].to(cur.cache))
            if cur.respect_exec_mask:
                cur.end_offset[b] = end
            else:  # moshi keeps one offset for the whole batch here
                cur.end_offset[0] = end
        elif fs["kind"] == "batch":
            cur[b] = s.tensors[key].to(cur)
        elif fs["kind"] == "shared":
            cur.copy_(s.tensors[key].to(cur))
        else:
            setattr(st, fname, fs["value"])


def _restore_plan(lm: nn.Module, s: FastWeightState, b: int) -> list[tuple[State, str, dict, str, tp.Any]]:
    """(state, field, its metadata, tensor key, current value) of every field to restore, each checked."""
    mods = streaming_states(lm)
    spec = s.meta.get("attention_state") or {}
    if set(spec) != set(mods):
        raise StateMismatchError(f"the snapshot's attention state covers modules {sorted(spec)[:4]}..., the model "
                                 f"streams {sorted(mods)[:4]}...: another architecture.")
    plan = []
    for name, entry in spec.items():
        mod, st = mods[name]
        if type(st).__name__ != entry["type"]:
            raise StateMismatchError(f"{name}: snapshot state {entry['type']}, model state {type(st).__name__}.")
        for fname, fs in entry["fields"].items():
            if not hasattr(st, fname):
                raise StateMismatchError(f"{name}: the model's streaming state has no field {fname}.")
            cur, key = getattr(st, fname), f"{ATTN_PREFIX}{name}.{fname}"
            if fs["kind"] == "ring":
                k, v = s.tensors[key + ".keys"], s.tensors[key + ".values"]
                H, D = cur.cache.shape[2], cur.cache.shape[4]
                ctx = getattr(mod, "context", None) or cur.capacity
                need = min(fs["end_offset"], ctx, cur.capacity)
                if k.shape[0] != H or k.shape[2] != D or k.shape != v.shape or k.shape[1] < need:
                    raise StateMismatchError(f"{name}: KV cache {list(k.shape)} does not fit heads {H}, head dim "
                                             f"{D}, needing at least {need} positions.")
            elif fs["kind"] in ("batch", "shared"):
                t = s.tensors[key]
                want = cur[b].shape if fs["kind"] == "batch" else cur.shape
                if tuple(t.shape) != tuple(want):
                    raise StateMismatchError(f"{name}.{fname}: shape {list(t.shape)}, the model's is {list(want)}.")
            plan.append((st, fname, fs, key, cur))
    return plan
