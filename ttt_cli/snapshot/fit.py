"""Whether a snapshot fits a model: the model's side (config, fingerprints) and the reasons it does not fit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing as tp
from dataclasses import dataclass

from ..errors import StateMismatchError
from ..fastweights.attach import ttt_layers
from ..fastweights.config import FastWeightConfig
from ..fastweights.interface import FastWeightLayer
from .format import FINGERPRINT_VERSION, LATER_KEYS, FastWeightState


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

def as_lm(model_or_lm) -> tp.Any:
    """The moshi LMModel of a TTTModel (its `.lm`), or the LMModel itself.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel.
    """
    return getattr(model_or_lm, "lm", model_or_lm)


def fast_layers(model_or_lm) -> dict[int, FastWeightLayer]:
    """{layer index: fast-weight layer}; StateMismatchError when the model has none.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel.
    """
    layers = ttt_layers(as_lm(model_or_lm))
    if not layers:
        raise StateMismatchError("the model has no TTT layers (loaded with ttt=False or --ttt-layers none), "
                                 "so it has no fast weights to capture or restore.")
    return layers


@dataclass
class ModelSide:
    """What snapshots are compared against: a model's fast-weight layers, their config and fingerprints."""

    layers: dict[int, FastWeightLayer]
    config: FastWeightConfig  # the layers' settings now (e.g. after `set_ttt_lr`)
    fingerprint: str          # see `fingerprint`
    w0_fingerprint: str       # see `w0_fingerprint`


def model_side(model_or_lm) -> ModelSide:
    """The fast-weight layers of a model with their config and both fingerprints.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    layers = fast_layers(model_or_lm)
    return ModelSide(layers, _config(layers), _fingerprint(layers, initial_only=False),
                     _fingerprint(layers, initial_only=True))


def _fingerprint(layers: dict[int, FastWeightLayer], initial_only: bool) -> str:
    """`fingerprint` (every layer's fingerprint tensors and structural config, then the layer set), or with
    `initial_only` `w0_fingerprint` (θ0 only)."""
    h = hashlib.sha256()
    for i in sorted(layers):
        h.update(f"layer:{i};".encode())
        layers[i].fingerprint_update(h, initial_only=initial_only)
    if not initial_only:
        h.update(json.dumps({"layers": sorted(layers)}).encode())
    return h.hexdigest()


def _config(layers: dict[int, FastWeightLayer]) -> FastWeightConfig:
    sec = dict(next(iter(layers.values())).config_section())
    sec.pop("ttt_name", None)
    sec["layers"] = sorted(layers)
    return FastWeightConfig.from_dict(sec)


def model_config(model_or_lm) -> FastWeightConfig:
    """The TTT config a model runs with now (its layers' settings, e.g. after `set_ttt_lr`).

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    return _config(fast_layers(model_or_lm))


def fingerprints(model_or_lm) -> tuple[str, str]:
    """(model fingerprint, W0-only fingerprint), see `fingerprint` and `w0_fingerprint`.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    side = model_side(model_or_lm)
    return side.fingerprint, side.w0_fingerprint


def w0_fingerprint(model_or_lm) -> str:
    """Hex sha256 over the TTT layers' initial tensors (θ0: W0 for In-Place) only.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    return _fingerprint(fast_layers(model_or_lm), initial_only=True)


def fingerprint(model_or_lm) -> str:
    """Hex sha256 of what the fast-weight layers compute (SPEC §3.9, §5.3): in ascending layer order,
    each layer's `fingerprint_tensors()` (θ0 and the tensors defining its targets/projections) and
    its structural config keys, then the layer set. lr, clip and `ttt_name` are not part of it, so
    `--ttt-lr`, `-p off` and `--no-ttt` never make a snapshot unfit.

    Args:
        model_or_lm: a TTTModel or a moshi LMModel with TTT layers attached.
    """
    return _fingerprint(fast_layers(model_or_lm), initial_only=False)


# -- the check -----------------------------------------------------------------------------------

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
    snap_fp = s.meta.get("model_fingerprint")
    if not ttt_layers(as_lm(model_or_lm)):
        return FitReport([FitProblem("no-ttt", "the model has no TTT layers (loaded without TTT)", False)],
                         None, snap_fp)
    side = model_side(model_or_lm)
    cfg = side.config
    problems = _layout_problems(s, cfg)
    same_variant = s.variant == cfg.variant
    if same_variant:  # each layer says whether its part of the snapshot fits it
        problems += [FitProblem("shape", m, False) for i in sorted(set(s.layers) & set(cfg.layers))
                     for m in side.layers[i].check_capture(s.layer_tensors(i), i)]
        shapes_ok = all(p.kind != "shape" for p in problems)
        problems += _config_problems(s, cfg)
        # Another W0 or other target tensors: the fingerprint differs, which is never forced (SPEC §7.1).
        if shapes_ok and s.layers == cfg.layers:
            problems += _fingerprint_problems(s, side, any(p.kind == "config" for p in problems))
    return FitReport(problems, side.fingerprint, snap_fp)


def _layout_problems(s: FastWeightState, cfg: FastWeightConfig) -> list[FitProblem]:
    """Another variant, another layer set."""
    out = []
    if s.variant != cfg.variant:
        out.append(FitProblem("variant", f"the snapshot is of variant {s.variant!r}, the model runs "
                              f"{cfg.variant!r}", False))
    if s.layers != cfg.layers:
        only_s = sorted(set(s.layers) - set(cfg.layers))
        only_m = sorted(set(cfg.layers) - set(s.layers))
        detail = ", ".join(x for x in (f"only in the snapshot: {only_s}" if only_s else "",
                                       f"only in the model: {only_m}" if only_m else "") if x)
        out.append(FitProblem("layers", f"TTT layer set differs: snapshot {s.layers}, model {cfg.layers} "
                              f"({detail})", False))
    return out


def _config_problems(s: FastWeightState, cfg: FastWeightConfig) -> list[FitProblem]:
    """Structural keys (never forced) and update-rule rates (forceable) that differ, same variant."""
    out = []
    model_cfg, snap_cfg = cfg.to_dict(), s.config()
    for k in cfg.structural_keys:
        if k in LATER_KEYS and k not in s.meta:  # an older snapshot: its fingerprint covers the key
            continue
        if snap_cfg.get(k) != model_cfg[k]:
            out.append(FitProblem("config", f"TTT {k} differs: snapshot {json.dumps(snap_cfg.get(k))}, model "
                                  f"{json.dumps(model_cfg[k])}", False))
    for k in cfg.hyper_keys:
        a, b = snap_cfg.get(k), model_cfg[k]
        if a != b:
            out.append(FitProblem("hyper", f"TTT {k} differs: snapshot {json.dumps(a)}, model {json.dumps(b)}", True))
    return out


def _fingerprint_problems(s: FastWeightState, side: ModelSide, config_differs: bool) -> list[FitProblem]:
    """Another W0, an older fingerprint recipe, or other target tensors (same variant, layers and shapes)."""
    w0, snap_fp = side.w0_fingerprint, s.meta.get("model_fingerprint")
    if s.meta.get("w0_fingerprint") != w0:
        return [FitProblem("w0", f"the model's initial fast weights W0 differ from those the snapshot "
                           f"was taken from (snapshot model {s.meta.get('model') or 'unknown'}, W0 "
                           f"{str(s.meta.get('w0_fingerprint'))[:12]}; this model's W0 {w0[:12]})", False)]
    if s.meta.get("fingerprint_version") != FINGERPRINT_VERSION:
        return [FitProblem("fingerprint", "the snapshot was written by an older ttt whose fingerprint "
                           "did not cover the target tensors: its W0 and config match, its targets "
                           "cannot be checked (export it again)", True)]
    if snap_fp != side.fingerprint and not config_differs:
        return [FitProblem("fingerprint", f"model fingerprint differs (same W0 and TTT config, so the "
                           f"target generator's tensors differ): snapshot {str(snap_fp)[:12]}, model "
                           f"{side.fingerprint[:12]}", False)]
    return []
