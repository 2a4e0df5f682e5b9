"""TTT tensor names inside checkpoint weights files: recognise them and split them out before moshi loads the rest."""

from __future__ import annotations

import re

from ..errors import CheckpointError

# Our names and the fork's (`w_down_pretrained`, LoRA-wrapped `W_target`), with or without a prefix.
TTT_KEY = re.compile(r"^(?:.*\.)?transformer\.layers\.(\d+)\.gating\.(w_down|w_down_pretrained|target_generator\..+)$")


# The variants' tensors (SPEC §3.10 `...layers.{i}.ttt.*`, §3.11 `...layers.{i}.{target}.ttt_adapter.*`): ttt.safetensors only.
VARIANT_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(?:ttt|[\w.]+\.ttt_adapter)\.[\w.]+$")


def ttt_key(k: str) -> bool:
    """True for a key that names an In-Place TTT tensor (ours or the fork's)."""
    return bool(TTT_KEY.match(k))


def any_ttt_key(k: str) -> bool:
    """True for a key that names a TTT tensor of any variant."""
    return bool(TTT_KEY.match(k) or VARIANT_KEY.match(k))


def split_ttt(state: dict) -> tuple[dict, dict]:
    """(moshi's tensors, TTT tensors) of a weights dict; `state` itself loses the TTT keys."""
    ttt = {k: state.pop(k) for k in [k for k in state if ttt_key(k)]}
    return state, ttt


def safetensors_keys(path) -> list[str]:
    """The tensor names of a safetensors file (empty for None or another format)."""
    from safetensors import safe_open
    if path is None or not str(path).endswith((".safetensors", ".sft", ".sfts")):
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from None
