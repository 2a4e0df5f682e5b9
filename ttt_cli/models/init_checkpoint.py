"""`ttt init-checkpoint`: a loadable TTT checkpoint directory from a base checkpoint or preset (SPEC §5.4)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from moshi.models import loaders
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError
from ..fastweights.attach import variant_of
from ..fastweights.config import TTT_FILE, FastWeightConfig
from ..io import atomic_dir
from ..outputs import OutputPlan
from .config import default_ttt_section, parse_layers, resolve_ttt_config
from .loader import load_model
from .presets import PRESETS
from .resolver import FILE_KEYS, Resolved, checkpoint_info, file_ref, resolve, ttt_file
from .weights import load_lm
from .writer import add_ttt_to_checkpoint, ttt_tensors_for
from .yarn import YarnConfig


@dataclass
class InitResult:
    out: Path
    model_id: str
    ttt: dict
    files: list[str]
    target_init: str  # the init of fresh tensors (In-Place: ntp | zero)
    notes: list[str]  # where the fast-weight tensors come from (the source's own, or fresh: how, e.g. a fresh
    #                   `mlp` block is not neutral)
    source_layers: list[int] = field(default_factory=list)  # layers whose TTT tensors are the source's own


def checkpoint_is_ours(path: Path) -> bool:
    """A directory `ttt init-checkpoint` wrote: config.json with a `ttt` section, and only the files it writes
    (config.json, the TTT tensors, base files it copied). Only such a directory is replaced by --overwrite."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        entries = [c.name for c in path.iterdir()]
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or not isinstance(config.get("ttt"), dict):
        return False
    allowed = {"config.json", str(config["ttt"].get("ttt_name") or TTT_FILE)}
    allowed |= {str(config[k]) for k in FILE_KEYS if isinstance(config.get(k), str) and "/" not in config[k]}
    return all(name in allowed for name in entries)


def _output_plan(res: Resolved, out: Path, overwrite: bool):
    """Refuses an --out that is, holds or lies inside the source, or is a directory ttt did not write (SPEC §7.1)."""
    plan = OutputPlan(overwrite)
    if res.directory is not None:
        plan.read(res.directory, f"the source checkpoint {res.model_id}", tree=True)
        for key in FILE_KEYS:  # files the source names outside its directory are inputs too
            name = res.config.get(key)
            if isinstance(name, str) and not name.startswith("hf://"):
                plan.read(Path(file_ref(res, name)), f"a file of the source checkpoint ({key})")
    plan.replace_tree(out, "--out", "a checkpoint directory", checkpoint_is_ours)
    return plan.check().prepare()


def init_checkpoint(source: str | None, out: Path, layers: list[int] | str | None = None, target_init: str | None = None,
                    section: dict | None = None, copy_base: bool = False, overwrite: bool = False,
                    yarn_scale: float | None = None) -> InitResult:
    """Writes a loadable TTT checkpoint directory from a base checkpoint or preset, then loads it back.

    A source with its own TTT tensors (a preset, a TTT checkpoint) keeps them: writing preset P writes P,
    so `--model <out>` loads as `--model P` (SPEC §4.1). Layers the source has no tensors for, another
    variant, options that change what the tensors are (all but layers, chunk size, rate and clip), or an
    In-Place `target_init` given explicitly get the variant's fresh init instead.

    The directory is built under a temporary name beside `out` and moved into place only when
    complete; an existing `out` is replaced only with `overwrite` and only if this tool wrote it
    (`checkpoint_is_ours`); an `out` that is, contains or lies inside the source is refused.

    Args:
        source: base checkpoint (preset, directory, hub id).
        out: directory to write.
        layers: TTT layers, as a list or `--ttt-layers` syntax (default: every 6th from 0, or the preset's).
        target_init: In-Place: `ntp` or `zero` (SPEC §3.6), for fresh tensors; given, it makes every
            In-Place tensor fresh. Default: the source's own tensors where it has them, else `ntp`.
        section: further `ttt` keys (variant, chunk_size, lr, ...). A `variant` other than the source's
            keeps its layers and takes that variant's defaults; `lr` sets the variant's rate.
        copy_base: copy the base weights into `out` instead of referencing them.
        overwrite: replace an existing `out` that an earlier `ttt init-checkpoint` wrote.
        yarn_scale: write a `yarn_config` with this scale (SPEC §4.3; the fork's other defaults,
            `original_max_seq_len` = the config's `context`).
    Raises:
        OutputError: `out` may not be written (see above); ConfigError: unwritable parent; OSError: the
            write failed (nothing of it is left).
    """
    out = Path(out)
    res = resolve(source)
    if res.fork is not None:
        raise ConfigError(f"--from {source}: a fine-tuning fork checkpoint loads as it is (--model {source} "
                          f"--base ...); init-checkpoint makes TTT checkpoints from base models.")
    plan = _output_plan(res, out, overwrite)
    info = checkpoint_info(res)
    base_cfg, sec = _sections(res, info, layers, section)
    own, why_not = _own_tensors(res, base_cfg, sec, target_init)
    init = target_init or "ntp"
    try:
        with atomic_dir(out, replace=True) as tmp:
            cfg, kept = _write_checkpoint(res, info, tmp, sec, init, copy_base, yarn_scale, own)
    finally:
        plan.cleanup()
    m = load_model(str(out), device="cpu", dtype="fp32")  # verify it loads before reporting success
    if m.ttt is None or m.ttt.layers != cfg.layers:
        raise CheckpointError(f"{out} was written but does not load back with TTT layers {cfg.layers}.")
    notes = _notes(res, cfg, kept, init, why_not)
    return InitResult(out, res.model_id, cfg.to_dict(), sorted(p.name for p in out.iterdir()), init, notes, kept)


def _sections(res: Resolved, info, layers: list[int] | str | None,
              section: dict | None) -> tuple[FastWeightConfig, dict]:
    """(the source's `ttt` config, or the default one; the section to write: the source's with `layers` and
    `section` applied, checked against the keys of the variant it ends up with)."""
    num_layers = int((info.lm_config or {}).get("num_layers", 32))
    base_cfg, _ = resolve_ttt_config(res.config, num_layers)
    base_cfg = base_cfg or FastWeightConfig.from_dict(default_ttt_section(num_layers), num_layers)
    overrides = dict(section or {})
    if layers is not None:
        overrides["layers"] = parse_layers(layers, num_layers) if isinstance(layers, str) else layers
    overrides["ttt_name"] = TTT_FILE
    return base_cfg, base_cfg.with_overrides(overrides, num_layers).to_dict()


def _notes(res: Resolved, cfg: FastWeightConfig, kept: list[int], init: str, why_not: str) -> list[str]:
    """Where the written fast-weight tensors come from: the source's own (`kept` layers) or fresh (how, and why)."""
    fresh = [i for i in cfg.layers if i not in kept]
    notes = []
    if kept:
        notes.append(f"layer(s) {kept}: {res.model_id}'s own tensors ({cfg.ttt_name}), as --model {res.model_id} "
                     f"loads them")
    if fresh:
        notes.append((f"layer(s) {fresh}: " if kept else "") + variant_of(cfg).fresh_note(cfg, init)
                     + (f" ({why_not})" if why_not else ""))
    return notes


# `ttt` keys that leave the meaning of the tensors unchanged: the source's tensors stay valid.
TENSOR_NEUTRAL_KEYS = ("layers", "chunk_size", "ttt_name", "delta_clip_fro_norm", "delta_clip_epsilon")


def _own_tensors(res: Resolved, own_cfg: FastWeightConfig, sec: dict, target_init: str | None) -> tuple[dict, str]:
    """The source's own TTT tensors that the section written may keep, and, where none, why (for the note)."""
    own = res.config.get("ttt")
    if not isinstance(own, dict) or "random_weights" in res.config:
        return {}, ""
    if target_init is not None and sec.get("variant", "inplace") == "inplace":
        return {}, f"--target-init {target_init} asks for fresh tensors"
    src = own_cfg.to_dict()
    if src.get("variant") != sec.get("variant"):
        return {}, ""
    neutral = {*TENSOR_NEUTRAL_KEYS, type(own_cfg).rate_key}
    changed = sorted(k for k in set(src) | set(sec) if k not in neutral and src.get(k) != sec.get(k))
    if changed:
        return {}, (f"{res.model_id}'s own tensors do not fit: {', '.join(changed)} "
                    f"{'differs' if len(changed) == 1 else 'differ'} from its `ttt` section")
    path = ttt_file(res, str(own.get("ttt_name") or TTT_FILE))
    try:
        return load_file(str(path), device="cpu"), ""
    except Exception as e:
        raise CheckpointError(f"cannot read the TTT tensors of {res.model_id} ({path}): {e}") from None


def yarn_config_for(scale: float, context: int | None) -> dict:
    """A `yarn_config` section with the fork's defaults (beta 32/1, mscale 1/0) and the given scale."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 1:
        raise ConfigError(f"--yarn-scale {scale}: YaRN extends the attention context; the scale must be >= 1.")
    if not isinstance(context, int):
        raise ConfigError("--yarn-scale: the base config has no integer `context` to extend.")
    section = {"enabled": True, "scale": float(scale), "original_max_seq_len": context, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0}
    YarnConfig.from_dict(section, context)
    return section


def _write_checkpoint(res: Resolved, info, tmp: Path, sec: dict, target_init: str, copy_base: bool,
                      yarn_scale: float | None = None, own: dict | None = None) -> tuple[FastWeightConfig, list[int]]:
    """Fills directory `tmp`: config.json (moshi's keys, file references or copies) and the TTT tensors:
    a layer's own tensors (`own`, the source's) where they hold all of its tensors in the fresh shapes, else fresh.

    Returns (the section written, the layers whose tensors are the source's own).
    """
    config = {k: v for k, v in res.config.items() if k not in ("ttt", "ttt_config")}
    if not config:  # legacy hub repo without config.json: moshi's default file names
        config = {"moshi_name": loaders.MOSHI_NAME, "mimi_name": loaders.MIMI_NAME,
                  "tokenizer_name": loaders.TEXT_TOKENIZER_NAME}
    for key in [k for k in FILE_KEYS if config.get(k)]:
        name = config[key]
        ref = file_ref(res, name)
        if copy_base or res.directory is not None and res.model_id in PRESETS:
            src = loaders.hf_get(ref) if ref.startswith("hf://") else Path(ref)
            shutil.copyfile(src, tmp / Path(name).name)  # contents only: the user's umask, not the source's mode
            config[key] = Path(name).name
        else:
            config[key] = ref
    if info.lm_config is not None:
        for k, v in info.lm_config.items():
            config.setdefault(k, v)
    if yarn_scale is not None:
        config["yarn_config"] = yarn_config_for(yarn_scale, config.get("context"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    lm = load_lm(checkpoint_info(Resolved(str(tmp), config, tmp)), "cpu", torch.float32).lm
    cfg = FastWeightConfig.from_dict(sec, int(config.get("num_layers", 32)))
    tensors = ttt_tensors_for(lm, cfg, target_init)  # may resolve keys in `cfg` (mlp: num_heads null -> the layer's)
    kept = []
    for i in cfg.layers:
        keys = [k for k in tensors if k.startswith(f"transformer.layers.{i}.")]
        if own and keys and all(k in own and own[k].shape == tensors[k].shape for k in keys):
            tensors.update({k: own[k].contiguous() for k in keys})
            kept.append(i)
    # Only the source's own tensors: its section as it is (writing P writes P's config too).
    written = sec if own and len(kept) == len(cfg.layers) else cfg.to_dict()
    return add_ttt_to_checkpoint(tmp, written, lm, target_init, tensors), kept
