"""The stable snapshot API of SPEC §5.0 (capture, restore, save_state, load_state, ...): `ttt_cli.snapshot` re-exported."""

from __future__ import annotations

from .snapshot.attention import SKIP_FIELDS
from .snapshot.capture import capture, restore, restore_layers
from .snapshot.files import load_state, save_state
from .snapshot.fit import FitProblem, FitReport, check_fits, fingerprint, fingerprints, model_config, w0_fingerprint
from .snapshot.format import (ATTN_PREFIX, FINGERPRINT_VERSION, FORMAT, FORMAT_VERSION, INVALID_HINT, LATER_KEYS,
                              LAYER_KEY, META_KEY, FastWeightState, config_keys, weight_names, weight_norm)
from .snapshot.inspect import (DIFF_META_KEYS, DiffResult, InspectResult, LayerDiff, LayerReport, diff_states,
                               inspect_state)

__all__ = [
    "ATTN_PREFIX", "DIFF_META_KEYS", "FINGERPRINT_VERSION", "FORMAT", "FORMAT_VERSION", "INVALID_HINT", "LATER_KEYS",
    "LAYER_KEY", "META_KEY", "SKIP_FIELDS", "DiffResult", "FastWeightState", "FitProblem", "FitReport", "InspectResult",
    "LayerDiff", "LayerReport", "capture", "check_fits", "config_keys", "diff_states", "fingerprint", "fingerprints",
    "inspect_state", "load_state", "model_config", "restore", "restore_layers", "save_state", "w0_fingerprint",
    "weight_names", "weight_norm",
]
