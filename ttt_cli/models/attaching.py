"""TTT attached to a loaded LM from what its checkpoint stores: one path for every variant of the registry."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from moshi.modules.lora import LoRALinear

from ..errors import CheckpointError
from ..fastweights.attach import attach_ttt, variant_of
from ..fastweights.config import TTT_FILE, FastWeightConfig
from ..fastweights.inplace import W0, checkpoint_key
from .fork import ForkMapping, normalise_ttt_tensors
from .resolver import Resolved, ttt_file
from .tensors import any_ttt_key, by_layer, check_ttt_tensors, ttt_key
from .weights import LoadedLM, frozen_linear_out, read_weights

Warn = tp.Callable[[str], None]


def attach_from_checkpoint(lm, res: Resolved, cfg: FastWeightConfig, origin: str, loaded: LoadedLM,
                           target_init: str | None, mapping: ForkMapping | None, warn: Warn, prov: dict) -> None:
    """Attaches `cfg`'s layers with the tensors the checkpoint stores; missing ones get the variant's fresh init,
    said once through `warn` (not for the default section, which has no tensors by design).

    Stored tensors are those of the checkpoint's own TTT tensors file (`ttt_name`, when its section is for this
    variant) and, for a variant that takes In-Place tensors, those found in the LM weights files, under our
    names or the fork's (SPEC §4.2, §4.3).

    Args:
        lm: the loaded LM (`weights.load_lm` and siblings), TTT not yet attached.
        res: the resolved checkpoint.
        cfg: the `ttt` section to attach (overrides applied).
        origin: where `cfg` came from: ttt | fork | default.
        loaded: what building the LM read (its TTT tensors, the LoRA scaling).
        target_init: `ntp` or `zero` for fresh target generators (default: `zero` for forks, else `ntp`).
        mapping: a fork checkpoint's `ttt_config` mapping (None for ours).
        warn: says a warning once.
        prov: the provenance being built: gets `ttt_tensors` (and `files.ttt` when that file is read).
    """
    variant = variant_of(cfg)
    names = variant.tensor_names(cfg)
    inplace = any(map(ttt_key, names))  # In-Place tensors: they may sit in LM weights files, with the fork's names
    fork = res.fork is not None
    tensors, origins = _stored_tensors(lm, res, cfg, origin, loaded, mapping, prov, inplace)
    if fork and inplace:
        _fork_w0(lm, cfg.layers, tensors, origins)
    init = target_init or ("zero" if fork and inplace else "ntp")
    missing = [k for k in names if k not in tensors]
    if missing and origin != "default":
        how = variant.fresh_note(cfg, init) + (" (the fork's own warm start)" if fork and inplace and init == "zero"
                                               else "")
        warn(f"checkpoint {res.model_id} lacks TTT tensors {', '.join(missing[:6])}"
             f"{' ...' if len(missing) > 6 else ''}: {how}.")
    attach_ttt(lm, cfg, tensors, target_init=init)
    prov["ttt_tensors"] = variant.provenance(cfg, origins, init)


def _stored_tensors(lm, res: Resolved, cfg: FastWeightConfig, origin: str, loaded: LoadedLM,
                    mapping: ForkMapping | None, prov: dict, inplace: bool) -> tuple[dict, dict]:
    """The checkpoint's TTT tensors for `cfg`, float32 with our key names, and {key: where it came from}.

    In-Place tensors are checked file by file as stored (dtype, shape for the model, finite), then the fork's
    names are mapped onto ours; a variant's are checked by its `attach`.
    """
    raw = dict(loaded.ttt) if inplace else {}
    files = dict(loaded.ttt_files) if inplace else {}
    if origin == "ttt" and _has_ttt_file(res) and _own_variant(res) == cfg.variant:
        own, path = _read_ttt_file(res, cfg.ttt_name, ttt_key if inplace else any_ttt_key)
        raw.update(own)
        files.update({k: str(path) for k in own})
        prov.setdefault("files", {})["ttt"] = str(path)
    if not inplace:
        return {k: v.float() for k, v in raw.items()}, {k: f"{Path(files[k]).name}:{k}" for k in raw}
    shapes = {i: tuple(frozen_linear_out(lm.transformer.layers[i].gating).shape)
              for i in cfg.layers if i < len(lm.transformer.layers)}
    by_file: dict[str, dict] = {}
    for k, v in raw.items():
        by_file.setdefault(files[k], {})[k] = v
    for f in sorted(by_file):
        check_ttt_tensors(by_file[f], f, shapes, cfg.conv_kernel_size)
    fork_layers = mapping.config.layers if res.fork is not None and mapping.config else None
    tensors: dict = {}
    origins: dict = {}
    for f, part in by_file.items():
        t, o = normalise_ttt_tensors(by_layer(part), fork_layers, Path(f), loaded.lora_scaling)
        tensors.update(t)
        origins.update(o)
    return tensors, origins


def _fork_w0(lm, layers: list[int], tensors: dict, origins: dict) -> None:
    """The fork's W0 where its checkpoint stores none: the base linear_out, never with a LoRA delta (SPEC §4.3)."""
    for i in layers:
        key = checkpoint_key(i, W0)
        if key not in tensors:
            g = lm.transformer.layers[i].gating
            tensors[key] = frozen_linear_out(g).detach().to(torch.float32).clone()
            origins[key] = "linear_out" + (" (base weight, LoRA delta not applied)"
                                           if isinstance(g.linear_out, LoRALinear) else "")


def _own_variant(res: Resolved) -> str:
    """The variant the checkpoint's own `ttt` section (and so its TTT tensors file) is for. Another variant
    attached by an override (`ttt bench`, `--ttt ...`) gets that variant's documented fresh init instead."""
    return res.config["ttt"].get("variant", "inplace")


def _has_ttt_file(res: Resolved) -> bool:
    """Whether the checkpoint names a TTT tensors file (random-weights presets have none: §3.6 init)."""
    return bool(res.config["ttt"].get("ttt_name", TTT_FILE)) and "random_weights" not in res.config


def _read_ttt_file(res: Resolved, name: str, accept: tp.Callable[[str], bool]) -> tuple[dict, Path]:
    """The checkpoint's own TTT tensors file (`ttt_name`); keys `accept` refuses are an error."""
    path = ttt_file(res, name)
    raw = read_weights(path)
    bad = [k for k in raw if not accept(k)]
    if bad:
        raise CheckpointError(f"{path} holds keys that are not TTT tensors: {bad[:5]}")
    return raw, Path(path)
