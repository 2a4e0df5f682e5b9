"""Reading snapshots for people: per-layer norms, drift and fit (`inspect_state`), and two compared (`diff_states`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import StateMismatchError
from ..fastweights.config import all_config_keys
from .capture import restore_layers
from .fit import FitReport, as_lm, check_fits, fast_layers
from .format import FastWeightState, frobenius_norm, weight_names, weight_norm


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
        lm = as_lm(model)
        fit = check_fits(lm, s)
        if not any(p.kind in ("no-ttt", "variant", "layers", "shape") for p in fit.problems):
            measured = _measured_drift(lm, s)
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


def _measured_drift(lm, s: FastWeightState) -> dict[int, tuple[float, float]]:
    """{layer: (‖θ0‖, drift)} of the snapshot restored into `lm` (which fits it); {} where the model cannot hold it."""
    measured = {}
    layers = fast_layers(lm)
    with torch.no_grad(), lm.streaming(1):
        try:
            restore_layers(lm, {i: s.layer_tensors(i) for i in layers}, 0)
        except StateMismatchError:  # e.g. a model with TTT off cannot hold moved weights
            layers = {}
        for i, layer in layers.items():  # the layer's own telemetry: no variant internals here
            measured[i] = (frobenius_norm(layer.initial_tensors().values()),
                           float(layer.telemetry(0)["relative_drift"]))
    return measured


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


DIFF_META_KEYS = tuple(k for k in all_config_keys() if k != "ttt_name") + (
    "model", "model_fingerprint", "w0_fingerprint", "steps", "seconds", "source_files", "reset_policy", "flushed",
    "attention")


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
        row = LayerDiff(i, frobenius_norm(ta[n] for n in na), frobenius_norm(tb[n] for n in nb), a.pending_tokens(i),
                        b.pending_tokens(i), na == nb and all(ta[n].shape == tb[n].shape for n in na))
        if row.comparable:
            row.diff_norm = frobenius_norm((ta[n] - tb[n]) for n in na)
            row.relative_diff = row.diff_norm / max(row.w_norm_a, 1e-30)
            row.max_abs_diff = max(float((ta[n] - tb[n]).abs().max()) for n in na)
            row.identical = set(ta) == set(tb) and all(ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k])
                                                       for k in ta)
        rows.append(row)
    differs = {k: [a.meta.get(k), b.meta.get(k)] for k in DIFF_META_KEYS if a.meta.get(k) != b.meta.get(k)}
    return DiffResult(rows, sorted(set(a.layers) - set(b.layers)), sorted(set(b.layers) - set(a.layers)),
                      a.fingerprint == b.fingerprint, a.layers == b.layers and all(r.identical for r in rows), differs)
