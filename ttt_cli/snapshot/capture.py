"""Capture and restore one stream of a streaming LM: fast weights, and with `attention=True` the attention state."""

from __future__ import annotations

import datetime
import typing as tp

import torch

from .. import __version__
from ..errors import StateMismatchError
from ..units import FRAME_RATE
from .attention import capture_attention, restore_attention
from .fit import as_lm, check_fits, fast_layers, model_side
from .format import FINGERPRINT_VERSION, FORMAT, FORMAT_VERSION, FastWeightState, config_keys, frobenius_norm


def _streaming_layers(lm, how: str) -> dict:
    """The fast-weight layers, each streaming (else StateMismatchError: `how` says where to call from)."""
    layers = fast_layers(lm)
    for i, layer in layers.items():
        if not layer.is_streaming:
            raise StateMismatchError(f"TTT layer {i} is not streaming: {how} `lm.streaming(B)`.")
    return layers


def capture(lm, batch_index: int = 0, attention: bool = False) -> FastWeightState:
    """Snapshot of one stream's fast weights (and, with `attention`, its attention caches and offsets).

    Args:
        lm: a streaming moshi LMModel with TTT layers (or a TTTModel).
        batch_index: which stream of the batch.
        attention: also capture every other streaming state of that stream (KV caches, offsets), so
            that restoring continues bit-exactly (large: context x layers x d per stream).
    Returns:
        FastWeightState with the metadata the model knows (steps = tokens the first TTT layer has
        seen since its stream's last reset; callers add source files, reset policy, ...).
    """
    model, lm = lm, as_lm(lm)
    layers = _streaming_layers(lm, "capture a stream inside")
    side = model_side(lm)
    tensors: dict[str, torch.Tensor] = {}
    telemetry: dict[str, dict] = {}
    w0_norms: dict[str, float] = {}
    for i, layer in layers.items():
        for name, t in layer.capture(batch_index).items():
            tensors[f"layers.{i}.{name}"] = t.detach().to("cpu").contiguous()
        telemetry[str(i)] = layer.telemetry(batch_index)
        w0_norms[str(i)] = frobenius_norm(layer.initial_tensors().values())
    steps = int(next(iter(telemetry.values())).get("tokens", 0))
    cfg = side.config
    meta: dict[str, tp.Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        **{k: v for k, v in cfg.to_dict().items() if k in config_keys(cfg.variant)},
        "model": getattr(model, "model_id", None), "model_fingerprint": side.fingerprint,
        "fingerprint_version": FINGERPRINT_VERSION, "w0_fingerprint": side.w0_fingerprint,
        "batch_index": batch_index, "steps": steps, "seconds": steps / FRAME_RATE, "source_files": [],
        "reset_policy": None, "pending_tokens": {k: int(v.get("pending_tokens", 0)) for k, v in telemetry.items()},
        "flushed": False, "attention": attention, "telemetry": telemetry, "w0_norms": w0_norms,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
    }
    if attention:
        att, spec = capture_attention(lm, batch_index)
        tensors.update(att)
        meta["attention_state"] = spec
    return FastWeightState(tensors, meta)


def restore(lm, s: FastWeightState, batch_index: int = 0, force: bool = False) -> None:
    """Puts snapshot `s` into stream `batch_index` of a streaming LM.

    A fast-weight-only snapshot restored into a fresh stream continues like an uninterrupted run
    whose attention state was reset at the cut (SPEC §5.0); an `attention=True` snapshot restores
    the KV caches and offsets too and continues bit-exactly (same cache capacity). Shared
    counters moshi keeps for the whole batch (e.g. `offset_cpu`) are set from the snapshot.

    Args:
        lm: a streaming moshi LMModel with TTT layers (or a TTTModel).
        s: the snapshot.
        batch_index: which stream to overwrite.
        force: restore despite forceable differences (another lr or clip).
    Raises:
        StateMismatchError: the snapshot does not fit (the message says why); nothing is changed.
    """
    lm = as_lm(lm)
    check_fits(lm, s).raise_unless_fits(force)
    layers = _streaming_layers(lm, "restore into")
    saved = {i: layer.capture(batch_index) for i, layer in layers.items()}
    try:
        restore_layers(lm, {i: s.layer_tensors(i) for i in layers}, batch_index)
        if s.has_attention:
            restore_attention(lm, s, batch_index)
    except Exception:
        restore_layers(lm, saved, batch_index)  # a refused restore leaves the stream as it was
        raise


def restore_layers(lm, tensors: dict[int, dict[str, torch.Tensor]], batch_index: int = 0) -> None:
    """Puts per-layer tensors (as `FastWeightLayer.capture` returned them) back, without fit checks.

    Args:
        lm: a streaming moshi LMModel with TTT layers (or a TTTModel).
        tensors: {layer index: {name: tensor}}.
        batch_index: which stream.
    """
    layers = fast_layers(lm)
    for i, t in tensors.items():
        layers[i].restore(t, batch_index)
