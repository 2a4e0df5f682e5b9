"""Fast-weight snapshots: capture/restore one stream, safetensors files, fingerprints and fit checks (SPEC §5.0, §5.3)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .fastweights.attach import ttt_layers
from .units import FRAME_RATE
from .fastweights.config import FastWeightConfig, all_config_keys, config_class
from .errors import ConfigError, StateMismatchError
from .fastweights.interface import FastWeightLayer

FORMAT = "ttt-fast-weight-state"
FORMAT_VERSION = 1
FINGERPRINT_VERSION = 2  # 2: fingerprint_tensors + structural keys (1 hashed W0 and lr/clip)
META_KEY = "ttt_state"  # the safetensors header key holding the metadata JSON
LAYER_KEY = re.compile(r"^layers\.(\d+)\.([A-Za-z0-9_.]+)$")  # names may hold dots (adapter targets)
ATTN_PREFIX = "attention."
# Which TTT config keys a snapshot records, and which differences are structural (never forced) or
# update-rule rates (forceable), is each variant's config class's business (`structural_keys`,
# `hyper_keys`); `ttt_name` is never recorded.


def config_keys(variant: str) -> list[str]:
    """The `ttt` keys a snapshot of `variant` records in its metadata."""
    return [k for k in config_class(variant).valid_keys() if k != "ttt_name"]
# Keys added to a variant's section after snapshots of format 1 were written: absent means their default (null).
LATER_KEYS = ("activation",)
INVALID_HINT = "not a valid snapshot: write a new one with `ttt export-state`"
# moshi State fields that are not stream content.
SKIP_FIELDS = ("batch_size", "device", "exec_mask")


@dataclass
class FastWeightState:
    """One stream's fast-weight snapshot.

    `tensors` maps `layers.{i}.{name}` (the names a layer's `capture` returns; In-Place: `w` [d, h],
    `pending_z` [n, h], `pending_x0` [n, d], float32) and, for `attention=True` captures,
    `attention.{module}.{field}` to tensors. `meta` is the JSON metadata of SPEC §5.3.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, tp.Any]

    @property
    def layers(self) -> list[int]:
        return [int(i) for i in self.meta["layers"]]

    @property
    def variant(self) -> str:
        return self.meta["variant"]

    @property
    def has_attention(self) -> bool:
        return bool(self.meta.get("attention"))

    @property
    def fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """{name: tensor} of one TTT layer (what `FastWeightLayer.restore` takes)."""
        pre = f"layers.{layer}."
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}

    def pending_tokens(self, layer: int) -> int:
        return int(self.meta.get("pending_tokens", {}).get(str(layer), 0))

    def config(self) -> dict[str, tp.Any]:
        """The TTT config the snapshot was taken with (keys of its variant's `ttt` section)."""
        return {k: self.meta.get(k) for k in config_keys(self.variant)}


@dataclass
class FitProblem:
    """One reason a snapshot does not fit a model."""

    kind: str        # variant | layers | shape | config | hyper | w0 | fingerprint | no-ttt | attention
    message: str
    forceable: bool  # True where continuing is still well defined (see docs/state.md)


@dataclass
class FitReport:
    """Whether a snapshot fits a model, with precise reasons."""

    problems: list[FitProblem]
    model_fingerprint: str | None
    snapshot_fingerprint: str | None

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def forceable(self) -> bool:
        return all(p.forceable for p in self.problems)

    def reason(self) -> str:
        return "; ".join(p.message for p in self.problems)

    def raise_unless_fits(self, force: bool = False, flag: str = "--force-state") -> None:
        """Raises StateMismatchError unless the snapshot fits (or `force` and every problem is forceable).

        Args:
            force: accept forceable differences.
            flag: the command-line flag that sets `force`, named in the message.
        """
        if self.fits or (force and self.forceable):
            return
        hard = [p for p in self.problems if not p.forceable]
        hint = (f" Pass {flag} to restore anyway: the fast weights continue a well-defined "
                "stream, but not the one this model would have produced." if not hard else
                " This cannot be forced: the snapshot's tensors mean something else in this model.")
        raise StateMismatchError(f"the snapshot does not fit the model: {self.reason()}.{hint}",
                                 hint=f"pass {flag} to use it anyway" if not hard else None)

    def to_dict(self) -> dict:
        return {"fits": self.fits, "forceable": self.forceable, "model_fingerprint": self.model_fingerprint,
                "snapshot_fingerprint": self.snapshot_fingerprint,
                "problems": [dataclasses.asdict(p) for p in self.problems]}


# -- the model side ------------------------------------------------------------------------------

def _lm(model_or_lm) -> tp.Any:
    """Accepts a TTTModel (uses `.lm`) or a moshi LMModel."""
    return getattr(model_or_lm, "lm", model_or_lm)


def _layers(lm) -> dict[int, FastWeightLayer]:
    layers = ttt_layers(lm)
    if not layers:
        raise StateMismatchError("the model has no TTT layers (loaded with ttt=False or --ttt-layers none), "
                                 "so it has no fast weights to capture or restore.")
    return layers


def _layer_section(layer: FastWeightLayer) -> dict[str, tp.Any]:
    """A layer's settings as keys of the `ttt` section (the FastWeightLayer interface)."""
    return dict(layer.config_section())


def model_config(model_or_lm) -> FastWeightConfig:
    """The TTT config a model runs with now (its layers' settings, e.g. after `set_ttt_lr`).

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    layers = _layers(_lm(model_or_lm))
    sec = _layer_section(next(iter(layers.values())))
    sec.pop("ttt_name", None)
    sec["layers"] = sorted(layers)
    return FastWeightConfig.from_dict(sec)


def _hash(layers: dict[int, FastWeightLayer], initial_only: bool) -> str:
    h = hashlib.sha256()
    for i in sorted(layers):
        h.update(f"layer:{i};".encode())
        layers[i].fingerprint_update(h, initial_only=initial_only)
    if not initial_only:
        h.update(json.dumps({"layers": sorted(layers)}).encode())
    return h.hexdigest()


def fingerprints(model_or_lm) -> tuple[str, str]:
    """(model fingerprint, W0-only fingerprint), see `fingerprint` and `w0_fingerprint`."""
    layers = _layers(_lm(model_or_lm))
    return _hash(layers, initial_only=False), _hash(layers, initial_only=True)


def w0_fingerprint(model_or_lm) -> str:
    """Hex sha256 over the TTT layers' initial tensors (θ0: W0 for In-Place) only."""
    return _hash(_layers(_lm(model_or_lm)), initial_only=True)


def fingerprint(model_or_lm) -> str:
    """Hex sha256 of what the fast-weight layers compute (SPEC §3.9, §5.3): in ascending layer order,
    each layer's `fingerprint_tensors()` (θ0 and the tensors defining its targets/projections) and
    its structural config keys, then the layer set. lr, clip and `ttt_name` are not part of it, so
    `--ttt-lr`, `-p off` and `--no-ttt` never make a snapshot unfit.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    return _hash(_layers(_lm(model_or_lm)), initial_only=False)


def _fresh_capture(layer: FastWeightLayer) -> dict[str, torch.Tensor]:
    """What `capture` returns for a new stream of this layer (names and shapes to check against)."""
    saved = layer._streaming_state  # the layer may be streaming already: set it aside
    layer._streaming_state = None
    try:
        with layer.streaming(1):
            return layer.capture(0)
    finally:
        layer._streaming_state = saved


def _shape_problems(i: int, snap: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    out = []
    if set(snap) != set(ref):
        return [f"layer {i} holds tensors {sorted(snap)}, the model's layer holds {sorted(ref)}"]
    for name in sorted(ref):
        a, r = tuple(snap[name].shape), tuple(ref[name].shape)
        # A tensor the fresh stream holds with 0 rows (a pending chunk) may have any row count.
        variable = len(r) >= 1 and r[0] == 0
        if len(a) != len(r) or (a[1:] if variable else a) != (r[1:] if variable else r):
            want = ("[n, " + ", ".join(map(str, r[1:])) + "]") if variable else str(list(r))
            out.append(f"layers.{i}.{name} has shape {list(a)}, the model needs {want}")
    return out


def _fmt(v) -> str:
    return json.dumps(v)


def check_fits(model_or_lm, s: FastWeightState) -> FitReport:
    """Says whether snapshot `s` fits a model, with every reason it does not.

    Never forceable: no TTT layers, another variant, another layer set, other tensor shapes, another
    chunk size / conv / target source, another fingerprint (another W0 or other target tensors).
    Forceable: another lr or delta clip (update-rule hyperparameters), and a snapshot of an older
    fingerprint recipe whose W0 and config match.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
        s: the snapshot.
    """
    lm = _lm(model_or_lm)
    layers = ttt_layers(lm)
    snap_fp = s.meta.get("model_fingerprint")
    if not layers:
        return FitReport([FitProblem("no-ttt", "the model has no TTT layers (loaded without TTT)", False)],
                         None, snap_fp)
    cfg = model_config(lm)
    problems: list[FitProblem] = []
    if s.variant != cfg.variant:
        problems.append(FitProblem("variant", f"the snapshot is of variant {s.variant!r}, the model runs "
                                   f"{cfg.variant!r}", False))
    if s.layers != cfg.layers:
        only_s = sorted(set(s.layers) - set(cfg.layers))
        only_m = sorted(set(cfg.layers) - set(s.layers))
        detail = ", ".join(x for x in (f"only in the snapshot: {only_s}" if only_s else "",
                                       f"only in the model: {only_m}" if only_m else "") if x)
        problems.append(FitProblem("layers", f"TTT layer set differs: snapshot {s.layers}, model {cfg.layers} "
                                   f"({detail})", False))
    shapes_ok = True
    if s.variant == cfg.variant:
        for i in sorted(set(s.layers) & set(cfg.layers)):
            msgs = _shape_problems(i, s.layer_tensors(i), _fresh_capture(layers[i]))
            shapes_ok &= not msgs
            problems += [FitProblem("shape", m, False) for m in msgs]
    model_cfg = cfg.to_dict()
    if s.variant == cfg.variant:
        snap_cfg = s.config()
        for k in cfg.structural_keys:
            if k in LATER_KEYS and k not in s.meta:  # an older snapshot: its fingerprint covers the key
                continue
            if snap_cfg.get(k) != model_cfg[k]:
                problems.append(FitProblem("config", f"TTT {k} differs: snapshot {_fmt(snap_cfg.get(k))}, model "
                                           f"{_fmt(model_cfg[k])}", False))
        for k in cfg.hyper_keys:
            a, b = snap_cfg.get(k), model_cfg[k]
            if a != b:
                problems.append(FitProblem("hyper", f"TTT {k} differs: snapshot {_fmt(a)}, model {_fmt(b)}", True))
    model_fp, w0 = fingerprints(lm)
    # Another W0 or other target tensors: the fingerprint differs, which is never forced (SPEC §7.1).
    if shapes_ok and s.layers == cfg.layers and s.variant == cfg.variant:
        if s.meta.get("w0_fingerprint") != w0:
            problems.append(FitProblem("w0", f"the model's initial fast weights W0 differ from those the snapshot "
                                       f"was taken from (snapshot model {s.meta.get('model') or 'unknown'}, W0 "
                                       f"{str(s.meta.get('w0_fingerprint'))[:12]}; this model's W0 {w0[:12]})", False))
        elif s.meta.get("fingerprint_version") != FINGERPRINT_VERSION:
            problems.append(FitProblem("fingerprint", "the snapshot was written by an older ttt whose fingerprint "
                                       "did not cover the target tensors: its W0 and config match, its targets "
                                       "cannot be checked (export it again)", True))
        elif snap_fp != model_fp and not any(p.kind == "config" for p in problems):
            problems.append(FitProblem("fingerprint", f"model fingerprint differs (same W0 and TTT config, so the "
                                       f"target generator's tensors differ): snapshot {str(snap_fp)[:12]}, model "
                                       f"{model_fp[:12]}", False))
    return FitReport(problems, model_fp, snap_fp)


# -- capture / restore ---------------------------------------------------------------------------

def _norm(tensors: tp.Iterable[torch.Tensor]) -> float:
    """Frobenius norm over several tensors together (float64 accumulation)."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def weight_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """A layer's fast-weight tensors in a snapshot: every captured tensor but the pending chunk / sums / count
    (a name any of whose dotted parts starts with `pending`)."""
    return sorted(n for n in tensors if not any(part.startswith("pending") for part in n.split(".")))


def weight_norm(s: FastWeightState, layer: int) -> float:
    """‖W‖_F of one layer's fast weights in a snapshot."""
    t = s.layer_tensors(layer)
    return _norm(t[n] for n in weight_names(t))


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _streaming_modules(lm) -> dict[str, tp.Any]:
    """The LM's streaming modules other than fast-weight layers, by qualified name ('' = the LM)."""
    from moshi.modules.streaming import StreamingModule
    return {n: m for n, m in lm.named_modules() if isinstance(m, StreamingModule)
            and not isinstance(m, FastWeightLayer) and m._streaming_state is not None}


def _ring_positions(end: int, n: int, capacity: int) -> torch.Tensor:
    # Ring slot of each of the last n positions, oldest first (RingKVCache writes position p at p % capacity).
    return torch.arange(end - n, end, dtype=torch.long) % capacity


def _capture_attention(lm, b: int) -> tuple[dict[str, torch.Tensor], dict[str, tp.Any]]:
    """Every non-TTT streaming state of batch item b (attention KV caches, offsets), capacity-independent."""
    from moshi.modules.transformer import RingKVCache
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, tp.Any] = {}
    for name, mod in _streaming_modules(lm).items():
        st = mod._streaming_state
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
    model = lm
    lm = _lm(lm)
    layers = _layers(lm)
    for i, layer in layers.items():
        if not layer.is_streaming:
            raise StateMismatchError(f"TTT layer {i} is not streaming: capture a stream inside `lm.streaming(B)`.")
    cfg = model_config(lm)
    tensors: dict[str, torch.Tensor] = {}
    telemetry: dict[str, dict] = {}
    w0_norms: dict[str, float] = {}
    for i, layer in layers.items():
        for name, t in layer.capture(batch_index).items():
            tensors[f"layers.{i}.{name}"] = t.detach().to("cpu").contiguous()
        telemetry[str(i)] = layer.telemetry(batch_index)
        w0_norms[str(i)] = _norm(layer.initial_tensors().values())
    steps = int(next(iter(telemetry.values())).get("tokens", 0))
    model_fp, w0_fp = fingerprints(lm)
    meta: dict[str, tp.Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        **{k: v for k, v in cfg.to_dict().items() if k in config_keys(cfg.variant)},
        "model": getattr(model, "model_id", None), "model_fingerprint": model_fp,
        "fingerprint_version": FINGERPRINT_VERSION, "w0_fingerprint": w0_fp, "batch_index": batch_index, "steps": steps,
        "seconds": steps / FRAME_RATE, "source_files": [], "reset_policy": None,
        "pending_tokens": {k: int(v.get("pending_tokens", 0)) for k, v in telemetry.items()},
        "flushed": False, "attention": attention, "telemetry": telemetry, "w0_norms": w0_norms, "created": _utc_now(),
        "tool_version": __version__,
    }
    if attention:
        att, spec = _capture_attention(lm, batch_index)
        tensors.update(att)
        meta["attention_state"] = spec
    return FastWeightState(tensors, meta)


def _restore_attention(lm, s: FastWeightState, b: int) -> None:
    from moshi.modules.transformer import RingKVCache
    mods = _streaming_modules(lm)
    spec = s.meta.get("attention_state") or {}
    if set(spec) != set(mods):
        raise StateMismatchError(f"the snapshot's attention state covers modules {sorted(spec)[:4]}..., the model "
                                 f"streams {sorted(mods)[:4]}...: another architecture.")
    # Check everything before touching anything, so a refused restore changes nothing.
    plan = []
    for name, entry in spec.items():
        st = mods[name]._streaming_state
        if type(st).__name__ != entry["type"]:
            raise StateMismatchError(f"{name}: snapshot state {entry['type']}, model state {type(st).__name__}.")
        for fname, fs in entry["fields"].items():
            if not hasattr(st, fname):
                raise StateMismatchError(f"{name}: the model's streaming state has no field {fname}.")
            cur, key = getattr(st, fname), f"{ATTN_PREFIX}{name}.{fname}"
            if fs["kind"] == "ring":
                k, v = s.tensors[key + ".keys"], s.tensors[key + ".values"]
                H, D = cur.cache.shape[2], cur.cache.shape[4]
                ctx = getattr(mods[name], "context", None) or cur.capacity
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
    for st, fname, fs, key, cur in plan:
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
    lm = _lm(lm)
    check_fits(lm, s).raise_unless_fits(force)
    layers = _layers(lm)
    for i, layer in layers.items():
        if not layer.is_streaming:
            raise StateMismatchError(f"TTT layer {i} is not streaming: restore into `lm.streaming(B)`.")
    saved = {i: layer.capture(batch_index) for i, layer in layers.items()}
    try:
        restore_layers(lm, {i: s.layer_tensors(i) for i in layers}, batch_index)
        if s.has_attention:
            _restore_attention(lm, s, batch_index)
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
    layers = _layers(_lm(lm))
    for i, t in tensors.items():
        layers[i].restore(t, batch_index)


# -- files ---------------------------------------------------------------------------------------

def _jsonable(meta: dict) -> str:
    from .io import shown
    try:
        return shown(json.dumps(meta, sort_keys=True, allow_nan=False, default=str))
    except ValueError as e:
        raise ConfigError(f"snapshot metadata is not valid JSON: {e}") from None


def save_state(s: FastWeightState, path: str | Path, metadata: dict | None = None, overwrite: bool = False,
               verify: bool = True) -> Path:
    """Writes a snapshot as safetensors (metadata JSON under the header key `ttt_state`), atomically.

    Args:
        s: the snapshot.
        path: file to write.
        metadata: keys added to (or replacing) `s.meta`: e.g. steps, seconds, source_files, reset_policy.
        overwrite: replace an existing file.
        verify: load the written (temporary) file back and check every tensor and the metadata before
            it replaces `path`; a mismatch raises StateMismatchError and leaves no file.
    Returns:
        The path written.
    Raises:
        ConfigError: `path` exists (without `overwrite`) or is a directory.
        OSError: the write failed (nothing is left at `path`'s temporary name; an existing `path` is unchanged).
    """
    from safetensors.torch import save_file
    from .io import atomic_write

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"refusing to overwrite {path}; pass --overwrite to replace.")
    if path.exists() and path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name for the snapshot.")
    meta = {**s.meta, **(metadata or {})}
    header = {META_KEY: _jsonable(meta), "format": "pt"}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in s.tensors.items()}
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=header)
        if verify:  # the temporary file is checked before it replaces anything: a bad write leaves nothing
            try:
                back = load_state(tmp)
            except StateMismatchError as e:
                raise StateMismatchError(f"{path} was written but does not read back ({e}); the disk may be "
                                         f"full or failing.") from None
            bad = [k for k in tensors if k not in back.tensors or not torch.equal(back.tensors[k], tensors[k])]
            if bad or set(back.tensors) != set(tensors) or back.meta != json.loads(header[META_KEY]):
                raise StateMismatchError(f"{path} was written but does not read back identically "
                                         f"({', '.join(bad[:3]) or 'metadata'}); the disk may be full or failing.")

    atomic_write(path, write)  # OSError on a full disk etc.: the commands report it as a write failure
    s.meta = json.loads(header[META_KEY])
    return path


def load_state(path: str | Path) -> FastWeightState:
    """Reads and validates a snapshot file.

    Args:
        path: a `.safetensors` file written by `save_state` / `ttt export-state`.
    Raises:
        ConfigError: missing path.
        StateMismatchError: unreadable, truncated or foreign file, or invalid contents (says which).
    """
    from safetensors import safe_open

    from .outputs import input_problem

    path = Path(path)
    problem = input_problem(path)
    if problem == "no such file":
        raise ConfigError(f"{path}: no such snapshot file.", hint="give the path of a snapshot (ttt export-state)")
    if problem is not None:
        raise ConfigError(f"{path}: {problem.replace('an audio file', 'a snapshot file')}.",
                          hint="give the path of a snapshot (ttt export-state)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateMismatchError(f"{path}: cannot read as safetensors ({detail}); the file is corrupted or "
                                 f"truncated, or not a safetensors file.", hint=INVALID_HINT) from None
    if META_KEY not in header:
        raise StateMismatchError(f"{path}: a safetensors file without `{META_KEY}` metadata: not a fast-weight "
                                 f"snapshot (write one with `ttt export-state`).", hint=INVALID_HINT)
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise StateMismatchError(f"{path}: its `{META_KEY}` metadata is not valid JSON ({e}).",
                                 hint=INVALID_HINT) from None
    _validate(path, meta, tensors)
    return FastWeightState(tensors, meta)


def _validate(path: Path, meta: tp.Any, tensors: dict[str, torch.Tensor]) -> None:
    def bad(msg: str) -> tp.NoReturn:
        raise StateMismatchError(f"{path}: invalid fast-weight snapshot: {msg}", hint=INVALID_HINT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        bad(f"its metadata does not say format {FORMAT!r}.")
    ver = meta.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        bad(f"format version {ver!r}; this ttt ({__version__}) reads versions up to {FORMAT_VERSION}.")
    try:
        variant_keys = config_keys(meta.get("variant"))
    except ConfigError as e:
        bad(str(e).removeprefix("invalid `ttt` config: "))
    missing = [k for k in variant_keys + ["model_fingerprint", "w0_fingerprint"]
               if k not in meta and k not in LATER_KEYS]
    if missing:
        bad(f"metadata lacks {', '.join(missing)}.")
    layers = meta["layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                               for i in layers):
        bad(f"layers must be a list of integers >= 0, got {layers!r}.")
    try:  # the TTT config keys: the variant's own validation, as for a checkpoint's `ttt` section
        config_class(meta["variant"]).from_dict({k: meta[k] for k in variant_keys if k in meta})
    except ConfigError as e:
        bad(f"metadata: {str(e).removeprefix('invalid `ttt` config: ')}")
    _validate_meta_values(meta, bad)
    seen: set[int] = set()
    for k, t in tensors.items():
        if k.startswith(ATTN_PREFIX):
            if not meta.get("attention"):
                bad(f"tensor {k} but the metadata says no attention state.")
            continue
        m = LAYER_KEY.match(k)
        if not m:
            bad(f"unexpected tensor {k} (expected layers.<i>.<name> or attention.<module>.<field>).")
        i = int(m.group(1))
        if i not in layers:
            bad(f"tensor {k} is for layer {i}, which the metadata does not list ({layers}).")
        if t.dtype != torch.float32:
            bad(f"tensor {k} is {t.dtype}, fast-weight tensors are float32.")
        if not torch.isfinite(t).all():
            bad(f"tensor {k} holds NaN or infinite values.")
        seen.add(i)
    if set(layers) - seen:
        bad(f"no tensors for layer(s) {sorted(set(layers) - seen)}.")
    _validate_pending(meta, tensors, bad)
    if meta.get("attention"):
        spec = meta.get("attention_state")
        if not isinstance(spec, dict):
            bad("attention=true but no attention_state metadata.")
        for name, entry in spec.items():
            for fname, fs in entry.get("fields", {}).items():
                key = f"{ATTN_PREFIX}{name}.{fname}"
                need = [key + ".keys", key + ".values"] if fs.get("kind") == "ring" else (
                    [key] if fs.get("kind") in ("batch", "shared") else [])
                lost = [n for n in need if n not in tensors]
                if lost:
                    bad(f"attention tensors {lost} are missing.")


def _is_num(v: tp.Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_meta_values(meta: dict, bad: tp.Callable[[str], tp.NoReturn]) -> None:
    """Types and ranges of the metadata values that commands read (a hand-edited header is refused, named)."""
    def check(key: str, ok: tp.Callable[[tp.Any], bool], want: str, optional: bool = True) -> None:
        if key in meta and not (optional and meta[key] is None) and not ok(meta[key]):
            bad(f"metadata `{key}` must be {want}, got {meta[key]!r}.")
    for k in ("model_fingerprint", "w0_fingerprint"):
        check(k, lambda v: isinstance(v, str) and v != "", "a hex digest", optional=False)
    check("steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
    check("seconds", lambda v: _is_num(v) and v >= 0, "a finite number >= 0")
    check("source_files", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of paths")
    check("pending_tokens", lambda v: isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 and x >= 0 for x in v.values()),
          "an object of integers >= 0")
    check("telemetry", lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
          "an object per layer")
    check("w0_norms", lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()),
          "an object of finite numbers")
    check("flushed", lambda v: isinstance(v, bool), "true or false")
    check("attention", lambda v: isinstance(v, bool), "true or false")
    for k in ("model", "created", "reset_policy", "tool_version", "label"):
        check(k, lambda v: isinstance(v, str), "a string")
    numeric = ("tokens", "updates", "resets", "clip_events", "nonfinite_events", "pending_tokens", "relative_drift")
    for i, t in (meta.get("telemetry") or {}).items():
        for k in numeric:
            if k in t and not _is_num(t[k]):
                bad(f"metadata `telemetry.{i}.{k}` must be a finite number, got {t[k]!r}.")


def _validate_pending(meta: dict, tensors: dict[str, torch.Tensor], bad: tp.Callable[[str], tp.NoReturn]) -> None:
    """In-Place layers: W is a matrix, the pending chunk's rows agree with each other, W and the metadata."""
    chunk = meta["chunk_size"]
    for i in meta["layers"]:
        w, z, x0 = (tensors.get(f"layers.{i}.{n}") for n in ("w", "pending_z", "pending_x0"))
        if w is None or z is None or x0 is None:
            continue  # another variant: its own tensors, checked against the model by check_fits
        if w.dim() != 2 or z.dim() != 2 or x0.dim() != 2:
            bad(f"layer {i}: w, pending_z and pending_x0 must be matrices, got shapes {list(w.shape)}, "
                f"{list(z.shape)}, {list(x0.shape)}.")
        d, h = w.shape
        if z.shape[0] != x0.shape[0] or z.shape[1] != h or x0.shape[1] != d:
            bad(f"layer {i}: pending_z {list(z.shape)} and pending_x0 {list(x0.shape)} do not fit w {list(w.shape)} "
                f"(expected [n, {h}] and [n, {d}]).")
        if z.shape[0] >= chunk:
            bad(f"layer {i}: {z.shape[0]} pending tokens, but a chunk of {chunk} would have been applied.")
        recorded = (meta.get("pending_tokens") or {}).get(str(i))
        if recorded is not None and recorded != z.shape[0]:
            bad(f"layer {i}: metadata says {recorded} pending tokens, the tensors hold {z.shape[0]}.")


# -- inspect / diff ------------------------------------------------------------------------------

@dataclass
class LayerReport:
    """One TTT layer of a snapshot: norms, drift, pending tokens."""

    layer: int
    w_norm: float          # ‖W‖_F
    w0_norm: float         # ‖W0‖_F
    delta_norm: float      # ‖W − W0‖_F
    relative_drift: float  # ‖W − W0‖_F / ‖W0‖_F
    pending_tokens: int
    tensors: dict[str, list[int]]
    drift_against: str     # "recorded" (the model it was taken from) or "model" (the one checked)


@dataclass
class InspectResult:
    """What `inspect_state` found."""

    meta: dict
    layers: list[LayerReport]
    fit: FitReport | None  # None when no model was given

    def to_dict(self) -> dict:
        return {"meta": self.meta, "layers": [dataclasses.asdict(r) for r in self.layers],
                "fit": None if self.fit is None else self.fit.to_dict()}


def inspect_state(s: FastWeightState, model=None) -> InspectResult:
    """Per layer ‖W‖, ‖W0‖, ‖W − W0‖, drift and pending tokens; with `model`, its fit and drift against its W0.

    Args:
        s: the snapshot.
        model: a TTTModel or LMModel (not streaming) to check against; None uses the recorded figures.
    """
    fit, measured = None, {}
    if model is not None:
        lm = _lm(model)
        fit = check_fits(lm, s)
        if not any(p.kind in ("no-ttt", "variant", "layers", "shape") for p in fit.problems):
            layers = _layers(lm)
            with torch.no_grad(), lm.streaming(1):
                try:
                    restore_layers(lm, {i: s.layer_tensors(i) for i in layers}, 0)
                except StateMismatchError:  # e.g. a model with TTT off cannot hold moved weights
                    layers = {}
                for i, layer in layers.items():  # the layer's own telemetry: no variant internals here
                    measured[i] = (_norm(layer.initial_tensors().values()),
                                   float(layer.telemetry(0)["relative_drift"]))
    rows = []
    for i in s.layers:
        if i in measured:
            (w0, drift), src = measured[i], "model"
        else:
            w0 = float(s.meta.get("w0_norms", {}).get(str(i), float("nan")))
            drift = float(s.meta.get("telemetry", {}).get(str(i), {}).get("relative_drift", float("nan")))
            src = "recorded"
        rows.append(LayerReport(i, weight_norm(s, i), w0, drift * w0, drift, s.pending_tokens(i),
                                {k: list(v.shape) for k, v in s.layer_tensors(i).items()}, src))
    meta = {k: v for k, v in s.meta.items() if k != "attention_state"}
    return InspectResult(meta, rows, fit)


@dataclass
class LayerDiff:
    """One TTT layer of two snapshots."""

    layer: int
    w_norm_a: float
    w_norm_b: float
    pending_a: int
    pending_b: int
    comparable: bool                   # same tensor names and weight shapes
    diff_norm: float | None = None     # ‖W_A − W_B‖_F
    relative_diff: float | None = None  # ‖W_A − W_B‖_F / ‖W_A‖_F
    max_abs_diff: float | None = None
    identical: bool = False            # every tensor, pending chunk included, bit-equal


@dataclass
class DiffResult:
    """What `diff_states` found."""

    layers: list[LayerDiff]
    only_in_a: list[int]
    only_in_b: list[int]
    same_fingerprint: bool
    identical: bool
    meta_differs: dict[str, list]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DIFF_META_KEYS = tuple(k for k in all_config_keys() if k != "ttt_name") + ("model", "model_fingerprint", "w0_fingerprint", "steps", "seconds", "source_files",
                                "reset_policy", "flushed", "attention")


def diff_states(a: FastWeightState, b: FastWeightState) -> DiffResult:
    """Compares two snapshots layer by layer, and the metadata that differs.

    Args:
        a: first snapshot.
        b: second snapshot.
    """
    rows = []
    for i in sorted(set(a.layers) & set(b.layers)):
        ta, tb = a.layer_tensors(i), b.layer_tensors(i)
        na, nb = weight_names(ta), weight_names(tb)
        row = LayerDiff(i, _norm(ta[n] for n in na), _norm(tb[n] for n in nb), a.pending_tokens(i),
                        b.pending_tokens(i), na == nb and all(ta[n].shape == tb[n].shape for n in na))
        if row.comparable:
            row.diff_norm = _norm((ta[n] - tb[n]) for n in na)
            row.relative_diff = row.diff_norm / max(row.w_norm_a, 1e-30)
            row.max_abs_diff = max(float((ta[n] - tb[n]).abs().max()) for n in na)
            row.identical = set(ta) == set(tb) and all(ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k])
                                                       for k in ta)
        rows.append(row)
    differs = {k: [a.meta.get(k), b.meta.get(k)] for k in DIFF_META_KEYS if a.meta.get(k) != b.meta.get(k)}
    return DiffResult(rows, sorted(set(a.layers) - set(b.layers)), sorted(set(b.layers) - set(a.layers)),
                      a.fingerprint == b.fingerprint, a.layers == b.layers and all(r.identical for r in rows), differs)
