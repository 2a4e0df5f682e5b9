"""Writers of `ttt eval librilight`'s own outputs: curve.csv, curve.png, token NLL files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ttt_cli.io import atomic_write
from ttt_cli.tables import csv_cell, write_table_csv

from ..report import interval_cells, position_bands, write_position_png

# ci_low/ci_high: the 95% interval of `nll`; vs_off*: nll − off's nll and its paired interval (SPEC §5.8),
# appended so that readers of the first seven columns keep working; empty cells where there is none.
CURVE_COLUMNS = ("policy", "bin_start_s", "bin_end_s", "nll", "nll_semantic", "nll_acoustic", "tokens",
                 "ci_low", "ci_high", "vs_off", "vs_off_ci_low", "vs_off_ci_high")
CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
TOKEN_NLL_DIR = "token_nll"


def curve_rows(policies: dict) -> list[list[str]]:
    """Rows of curve.csv from results.json's `policies` section.

    Args:
        policies: results.json's `policies` (name -> section with its `curve`).
    """
    rows = []
    for name, p in policies.items():
        for b in p["curve"]:
            rows.append([name, csv_cell(b["bin_start_s"]), csv_cell(b["bin_end_s"]), csv_cell(b["nll"]),
                         csv_cell(b["nll_semantic"]), csv_cell(b["nll_acoustic"]), str(b["tokens"]),
                         *interval_cells(b)])
    return rows


def write_curve_csv(path: Path, policies: dict) -> Path:
    """curve.csv: one row per policy and position bin, columns `CURVE_COLUMNS` (empty cell: no token).

    Args:
        path: where to write.
        policies: results.json's `policies`.
    """
    return write_table_csv(path, CURVE_COLUMNS, curve_rows(policies))


def write_curve_png(path: Path, policies: dict, title: str) -> Path:
    """curve.png: NLL vs position in the document, one line per policy, its 95% interval shaded (matplotlib).

    Args:
        path: where to write.
        policies: results.json's `policies`.
        title: the plot's title.
    """
    series = {name: [(b["bin_start_s"], b["bin_end_s"], b["nll"]) for b in p["curve"]]
              for name, p in policies.items()}
    labels = {name: f"{name} (mean {p['nll']:.3f})" for name, p in policies.items() if p.get("nll") is not None}
    return write_position_png(path, series, "NLL (nats per audio token)", title, labels,
                              bands=position_bands({name: p["curve"] for name, p in policies.items()}))


def token_nll_path(out: Path, policy_dir: str, doc_id: str) -> Path:
    """`token_nll/<policy dir>/<document id>.safetensors` (the id `<speaker>/<book>` makes a subfolder).

    Args:
        out: --out.
        policy_dir: the policy's directory name.
        doc_id: the document id.
    """
    return Path(out) / TOKEN_NLL_DIR / policy_dir / f"{doc_id}.safetensors"


def write_token_nll(path: Path, nll: torch.Tensor, codes: torch.Tensor, metadata: dict) -> Path:
    """Per-token NLL `nll` [dep_q, T] float32 (NaN: not scored) and the scored LM codes `codes` [K, T] int64.

    Args:
        path: where to write.
        nll: [dep_q, T] NLL per codebook and step.
        codes: [K, T] the LM input codes scored.
        metadata: what the file's `ttt_eval` metadata says (policy, document, resets, model, layout).
    """
    tensors = {"nll": nll.detach().to("cpu", torch.float32).contiguous(),
               "codes": codes.detach().to("cpu", torch.int64).contiguous()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"ttt_eval": json.dumps(metadata)}))
    back = load_file(str(path))
    if back["codes"].shape != tensors["codes"].shape or not torch.equal(back["codes"], tensors["codes"]) \
            or not torch.equal(back["nll"].isnan(), tensors["nll"].isnan()):
        raise OSError(f"{path} does not read back as written.")
    return Path(path)
