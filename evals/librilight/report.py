"""Writers of `ttt eval librilight` outputs, one per format: results.json, curve.csv, curve.png, token NLL files."""

from __future__ import annotations

import csv
import io
import json
import math
import typing as tp
from pathlib import Path

from ttt_cli.io import atomic_write, shown, write_json

CURVE_COLUMNS = ("policy", "bin_start_s", "bin_end_s", "nll", "nll_semantic", "nll_acoustic", "tokens")
RESULTS = "results.json"
CURVE_CSV = "curve.csv"
CURVE_PNG = "curve.png"
TOKEN_NLL_DIR = "token_nll"


def write_results(path: Path, results: dict) -> Path:
    """Writes results.json atomically, then reads it back and checks it parses to the same object."""
    write_json(path, results)
    back = json.loads(Path(path).read_text(encoding="utf-8"))
    if back != json.loads(shown(json.dumps(results, ensure_ascii=False))):  # names that are not UTF-8 shown as U+FFFD
        raise OSError(f"{path} does not read back as written.")
    return Path(path)


def csv_cell(v) -> str:
    """A CSV cell: empty for None/NaN, floats with 6 decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def curve_rows(policies: dict) -> list[list[str]]:
    """Rows of curve.csv from results.json's `policies` section."""
    rows = []
    for name, p in policies.items():
        for b in p["curve"]:
            rows.append([name, csv_cell(b["bin_start_s"]), csv_cell(b["bin_end_s"]), csv_cell(b["nll"]),
                         csv_cell(b["nll_semantic"]), csv_cell(b["nll_acoustic"]), str(b["tokens"])])
    return rows


def write_table_csv(path: Path, columns: tp.Sequence[str], rows: list[list[str]]) -> Path:
    """Writes a CSV atomically (header `columns`, then `rows`), then reads it back and checks it."""
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


def write_curve_csv(path: Path, policies: dict) -> Path:
    """curve.csv: one row per policy and position bin, columns `CURVE_COLUMNS` (empty cell: no token)."""
    return write_table_csv(path, CURVE_COLUMNS, curve_rows(policies))


def write_position_png(path: Path, series: dict[str, list[tuple[float, float, float | None]]], ylabel: str,
                       title: str, labels: dict[str, str] | None = None, where: str = "document") -> Path:
    """A value vs position plot, one line per series (matplotlib, Agg backend), checked as a PNG after writing.

    Args:
        series: name -> [(bin_start_s, bin_end_s, value or None)], drawn at the bin centres.
        ylabel, title: axis label and title.
        labels: legend text per name (default the name).
        where: what the position is in ("document", "recording").
    """
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ends = [e for pts in series.values() for _, e, _ in pts]
    scale, unit = (60.0, "min") if ends and max(ends) >= 600 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    styles = ("-", "--", "-.", ":")  # overlapping curves (e.g. document and never) stay visible
    for n, (name, pts) in enumerate(series.items()):
        xy = [((a + b) / 2 / scale, v) for a, b, v in pts if v is not None]
        if not xy:
            continue
        xs, ys = zip(*xy)
        ax.plot(xs, ys, linestyle=styles[n % len(styles)], marker="o" if len(xs) < 30 else None, markersize=3,
                linewidth=1.5, label=(labels or {}).get(name, name))
    ax.set_xlabel(f"position in {where} ({unit}, bin centre)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="policy", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    """Saves a matplotlib figure atomically as a PNG, closes it, and checks the file is a PNG."""
    from matplotlib import pyplot as plt
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            raise OSError(f"{path} is not a PNG after writing.")
    return Path(path)


def write_curve_png(path: Path, policies: dict, title: str) -> Path:
    """curve.png: NLL vs position in the document, one line per policy (matplotlib, Agg backend)."""
    series = {name: [(b["bin_start_s"], b["bin_end_s"], b["nll"]) for b in p["curve"]]
              for name, p in policies.items()}
    labels = {name: f"{name} (mean {p['nll']:.3f})" for name, p in policies.items() if p.get("nll") is not None}
    return write_position_png(path, series, "NLL (nats per audio token)", title, labels)


def token_nll_path(out: Path, policy_dir: str, doc_id: str) -> Path:
    """`token_nll/<policy dir>/<document id>.safetensors` (the id `<speaker>/<book>` makes a subfolder)."""
    return Path(out) / TOKEN_NLL_DIR / policy_dir / f"{doc_id}.safetensors"


def write_token_nll(path: Path, nll, codes, metadata: dict) -> Path:
    """Per-token NLL `nll` [dep_q, T] float32 (NaN: not scored) and the scored LM codes `codes` [K, T] int64."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {"nll": nll.detach().to("cpu", torch.float32).contiguous(),
               "codes": codes.detach().to("cpu", torch.int64).contiguous()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"ttt_eval": json.dumps(metadata)}))
    back = load_file(str(path))
    if back["codes"].shape != tensors["codes"].shape or not torch.equal(back["codes"], tensors["codes"]) \
            or not torch.equal(back["nll"].isnan(), tensors["nll"].isnan()):
        raise OSError(f"{path} does not read back as written.")
    return Path(path)
