"""Writers of `ttt eval asr`'s wer.csv and wer.png (SPEC §5.7), on the shared CSV and plot writers."""

from __future__ import annotations

import typing as tp
from pathlib import Path

from ttt_cli.tables import csv_cell, write_table_csv

from ..report import interval_cells, position_bands, write_position_png
from .metrics import WerBin

# ci_low/ci_high: the 95% interval of `wer`; vs_off*: wer − off's wer and its paired interval (SPEC §5.8),
# appended so that readers of the first six columns keep working; empty cells where there is none.
WER_COLUMNS = ("policy", "bin_start_s", "bin_end_s", "wer", "errors", "ref_words", "ci_low", "ci_high", "vs_off",
               "vs_off_ci_low", "vs_off_ci_high")
WER_CSV = "wer.csv"
WER_PNG = "wer.png"

Bins = tp.Sequence[tp.Union[WerBin, dict]]


def _bin(b: WerBin | dict) -> dict:
    return b.to_dict() if isinstance(b, WerBin) else b


def wer_rows(policies: tp.Mapping[str, Bins]) -> list[list[str]]:
    """Rows of wer.csv: one per policy and bin, in the policies' order (empty `wer`: no reference word).

    Args:
        policies: policy name -> its corpus bins.
    """
    rows = []
    for name, bins in policies.items():
        for b in map(_bin, bins):
            rows.append([name, csv_cell(float(b["bin_start_s"])), csv_cell(float(b["bin_end_s"])),
                         csv_cell(b["wer"]), str(b["errors"]), str(b["ref_words"]), *interval_cells(b)])
    return rows


def write_wer_csv(path: Path, policies: tp.Mapping[str, Bins]) -> Path:
    """wer.csv, columns `WER_COLUMNS`, written atomically and read back.

    Args:
        path: where to write.
        policies: policy name -> its corpus bins (`CorpusScore.bins`, or their `to_dict()` form as
            in results.json).
    """
    return write_table_csv(path, WER_COLUMNS, wer_rows(policies))


def write_wer_png(path: Path, policies: tp.Mapping[str, Bins], title: str,
                  overall: tp.Mapping[str, float] | None = None) -> Path:
    """wer.png: WER (%) vs position in the recording, one line per policy, its 95% interval shaded; written
    atomically and checked.

    Args:
        path: where to write.
        policies: policy name -> its corpus bins.
        title: the plot title (model, dataset).
        overall: policy name -> its corpus WER, shown in the legend.
    """
    series = {name: [(b["bin_start_s"], b["bin_end_s"], None if b["wer"] is None else 100 * b["wer"])
                     for b in map(_bin, bins)] for name, bins in policies.items()}
    labels = {name: f"{name} (WER {100 * w:.1f}%)" for name, w in (overall or {}).items()}
    bands = position_bands({name: [_bin(b) for b in bins] for name, bins in policies.items()}, scale=100.0)
    return write_position_png(path, series, "WER (%)", title, labels, where="recording", bands=bands)
