"""`ttt init-checkpoint`: a loadable TTT checkpoint directory from a base checkpoint or preset (SPEC §5.4)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..fastweights.config import TTT_FILE, FastWeightConfig
from .config import default_ttt_section, parse_layers, resolve_ttt_config
from .loader import _load_lm, load_model
from .presets import PRESETS
from .resolver import FILE_KEYS, Resolved, _file_ref, checkpoint_info, resolve
from .writer import add_ttt_to_checkpoint


@dataclass
class InitResult:
    out: Path
    model_id: str
    ttt: dict
    files: list[str]
    target_init: str
    notes: list[str]  # how the fast-weight tensors were initialised (e.g. a fresh `mlp` block is not neutral)


def init_checkpoint(source: str | None, out: Path, layers: list[int] | str | None = None, target_init: str = "ntp",
                    section: dict | None = None, copy_base: bool = False, overwrite: bool = False) -> InitResult:
    """Writes a loadable TTT checkpoint directory from a base checkpoint or preset, then loads it back.

    Args:
        source: base checkpoint (preset, directory, hub id).
        out: directory to write.
        layers: TTT layers, as a list or `--ttt-layers` syntax (default: every 6th from 0, or the preset's).
        target_init: In-Place: `ntp` or `zero` (SPEC §3.6).
        section: further `ttt` keys (variant, chunk_size, lr, ...). A `variant` other than the source's
            keeps its layers and takes that variant's defaults; `lr` sets the variant's rate.
        copy_base: copy the base weights into `out` instead of referencing them.
        overwrite: replace an existing non-empty `out`.
    """
    import torch
    from ..fastweights.attach import variant_of
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace it.")
    res = resolve(source)
    info = checkpoint_info(res)
    num_layers = int((info.lm_config or {}).get("num_layers", 32))
    base_cfg, _ = resolve_ttt_config(res.config, num_layers)
    base_cfg = base_cfg or FastWeightConfig.from_dict(default_ttt_section(num_layers), num_layers)
    overrides = dict(section or {})
    if layers is not None:
        overrides["layers"] = parse_layers(layers, num_layers) if isinstance(layers, str) else layers
    overrides["ttt_name"] = TTT_FILE
    sec = base_cfg.with_overrides(overrides, num_layers).to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        config = {k: v for k, v in res.config.items() if k not in ("ttt", "ttt_config")}
        if not config:  # legacy hub repo without config.json: moshi's default file names
            from moshi.models import loaders
            config = {"moshi_name": loaders.MOSHI_NAME, "mimi_name": loaders.MIMI_NAME,
                      "tokenizer_name": loaders.TEXT_TOKENIZER_NAME}
        for key in [k for k in FILE_KEYS if config.get(k)]:
            name = config[key]
            ref = _file_ref(res, name)
            if copy_base or res.directory is not None and res.model_id in PRESETS:
                from moshi.models.loaders import hf_get
                src = hf_get(ref) if ref.startswith("hf://") else Path(ref)
                shutil.copy(src, tmp / Path(name).name)
                config[key] = Path(name).name
            else:
                config[key] = ref
        if info.lm_config is not None:
            for k, v in info.lm_config.items():
                config.setdefault(k, v)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        lm, _ = _load_lm(checkpoint_info(Resolved(str(tmp), config, tmp)), "cpu", torch.float32)
        cfg = add_ttt_to_checkpoint(tmp, sec, lm, target_init)
        notes = [variant_of(cfg).fresh_note(cfg, target_init)]
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    m = load_model(str(out), device="cpu", dtype="fp32")  # verify it loads before reporting success
    if m.ttt is None or m.ttt.layers != cfg.layers:
        raise CheckpointError(f"{out} was written but does not load back with TTT layers {cfg.layers}.")
    return InitResult(out, res.model_id, cfg.to_dict(), sorted(p.name for p in out.iterdir()), target_init, notes)
