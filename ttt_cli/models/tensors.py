"""TTT tensor names inside checkpoint weights files: recognise them and split them out before moshi loads the rest."""

from __future__ import annotations

import re
import typing as tp

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..fastweights.inplace import KEY_PREFIX, TARGET_GENERATOR, W0, tensor_shapes
from .fork import FORK_W0, fork_tensor_shape


def _inplace_key() -> re.Pattern:
    """In-Place tensor keys: ours and the fork's (`w_down_pretrained`, LoRA-wrapped `W_target`: any tensor below
    the target generator), with or without a prefix; groups: layer index, name after `gating.`."""
    prefix = re.escape(KEY_PREFIX.format(i="INDEX")).replace("INDEX", r"(\d+)")
    names = "|".join([re.escape(W0), re.escape(FORK_W0), re.escape(TARGET_GENERATOR) + r"\..+"])
    return re.compile(rf"^(?:.*\.)?{prefix}({names})$")


TTT_KEY = _inplace_key()


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


def by_layer(raw: dict) -> dict[int, dict[str, tuple[str, tp.Any]]]:
    """In-Place TTT tensors ({key: tensor}, TTT keys only) by layer: {i: {name after `gating.`: (key, tensor)}}."""
    out: dict[int, dict[str, tuple[str, tp.Any]]] = {}
    for k, v in raw.items():
        m = TTT_KEY.match(k)
        out.setdefault(int(m.group(1)), {})[m.group(2)] = (k, v)
    return out


def safetensors_keys(path) -> list[str]:
    """The tensor names of a safetensors file (empty for None or another format)."""
    if path is None or not str(path).endswith((".safetensors", ".sft", ".sfts")):
        return []
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from None


def expected_ttt_shape(name: str, dim: int, hidden: int, kernel: int) -> tuple | None:
    """The shape a TTT tensor (name after `gating.`, ours or the fork's) must have; None for a LoRA factor
    (rank free)."""
    ours = tensor_shapes(dim, hidden, kernel)
    return ours[name] if name in ours else fork_tensor_shape(name, dim, hidden)


def check_ttt_tensors(raw: dict, file, shapes: dict[int, tuple[int, int]], kernel: int) -> None:
    """Refuses (CheckpointError naming file and key) a TTT tensor that is not floating point, has the
    wrong shape for its layer, or holds NaN/Inf (SPEC §7.1).

    Args:
        raw: {key: tensor} as read from `file` (TTT keys only).
        file: where they were read from (for the message).
        shapes: {layer index: (d, h)} of the layers that take TTT tensors.
        kernel: the config's conv kernel size.
    """
    for k, v in raw.items():
        m = TTT_KEY.match(k)
        i, name = int(m.group(1)), m.group(2)
        if not v.dtype.is_floating_point:
            raise CheckpointError(f"{file}: TTT tensor {k} has dtype {v.dtype}; a floating-point tensor is needed.")
        if i in shapes:
            d, h = shapes[i]
            want = expected_ttt_shape(name, d, h, kernel)
            lora = name.endswith(("lora_A.weight", "lora_B.weight"))
            bad_lora = lora and (v.dim() != 2 or (v.shape[1] if name.endswith("lora_A.weight") else v.shape[0]) != d)
            if (want is not None and tuple(v.shape) != want) or bad_lora:
                need = want if want is not None else ("(r, d)" if name.endswith("lora_A.weight") else "(d, r)")
                raise CheckpointError(f"{file}: TTT tensor {k} has shape {tuple(v.shape)}, layer {i} of the model "
                                      f"needs {need} (d={d}, h={h}, kernel {kernel}): the tensors do not fit this base.")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{file}: TTT tensor {k} holds non-finite values (NaN or Inf); refusing to load it.")
