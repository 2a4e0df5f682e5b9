"""CSV tables and PNG plots, each written atomically and checked after writing (eval curves, update series)."""

from __future__ import annotations

import csv
import io
import math
import typing as tp
from pathlib import Path

from .io import atomic_write

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def csv_cell(v) -> str:
    """A CSV cell: empty for None/NaN, floats with 6 decimals.

    Args:
        v: the value (None, float, int or str).
    """
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def write_table_csv(path: Path, columns: tp.Sequence[str], rows: list[list[str]]) -> Path:
    """Writes a CSV atomically (header `columns`, then `rows`), then reads it back and checks it.

    Args:
        path: where to write.
        columns: the header.
        rows: the rows, as strings (`csv_cell`).
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    atomic_write(path, lambda p: p.write_text(buf.getvalue()))
    with open(path, newline="") as f:
        back = list(csv.reader(f))
    if back != [list(columns)] + [list(r) for r in rows]:
        raise OSError(f"{path} does not read back as written.")
    return Path(path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display).

    Imported on the first plot rather than at the top: matplotlib with pyplot takes most of a
    second to import, and `ttt infer` and `ttt export-state` reach this module through
    `ttt_cli.telemetry` on every run, while they plot only with --telemetry.
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def save_png(fig, path: Path) -> Path:
    """Saves a matplotlib figure atomically as a PNG, closes it, and checks the file is a PNG.

    Args:
        fig: the figure (from `pyplot().subplots`).
        path: where to write.
    """
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        pyplot().close(fig)
    with open(path, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            raise OSError(f"{path} is not a PNG after writing.")
    return Path(path)
