"""What every eval writes the same way: results.json (checked after writing) and the value-vs-position plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ttt_cli.io import shown, write_json
from ttt_cli.outputs import json_with_keys
from ttt_cli.tables import csv_cell, pyplot, save_png

RESULTS = "results.json"


def results_record():
    """The recogniser of an eval's results.json (what --overwrite and --resume may replace)."""
    return json_with_keys("format_version", "protocol", "policies")


def write_results(path: Path, results: dict) -> Path:
    """Writes results.json atomically, then reads it back and checks it parses to the same object.

    Args:
        path: where to write.
        results: the content.
    """
    write_json(path, results)
    back = json.loads(Path(path).read_text(encoding="utf-8"))
    if back != json.loads(shown(json.dumps(results, ensure_ascii=False))):  # names that are not UTF-8 shown as U+FFFD
        raise OSError(f"{path} does not read back as written.")
    return Path(path)


def with_intervals(sections: dict[str, dict], intervals: dict[str, dict], key: str, curve: str) -> dict[str, dict]:
    """The policies' sections with `ci` and `vs_off` (SPEC §5.8) right after `key`, overall and in each bin.

    Args:
        sections: results.json's `policies` (name -> section with its per-bin list `curve`).
        intervals: `evals.intervals.policy_intervals`'s result.
        key: the figure the intervals are of (`nll`, `wer`).
        curve: the section's per-bin list (`curve`, `bins`).
    """
    none = {"ci": None, "vs_off": None}
    out = {}
    for name, s in sections.items():
        iv = intervals.get(name) or {**none, "bins": []}
        bins = [_beside(b, key, iv["bins"][i] if i < len(iv["bins"]) else none) for i, b in enumerate(s[curve])]
        out[name] = {**_beside(s, key, iv), curve: bins}
    return out


def _beside(d: dict, key: str, iv: dict) -> dict:
    """`d` with iv's `ci` and `vs_off` inserted after `key` (results.json reads in that order)."""
    out = {}
    for k, v in d.items():
        out[k] = v
        if k == key:
            out["ci"], out["vs_off"] = iv["ci"], iv["vs_off"]
    return out


def interval_cells(b: dict) -> list[str]:
    """The CSV cells `ci_low, ci_high, vs_off, vs_off_ci_low, vs_off_ci_high` of one bin (empty: none).

    Args:
        b: a bin of results.json (its `ci` and `vs_off`, when it has them).
    """
    ci, vs = b.get("ci") or (None, None), b.get("vs_off") or {}
    vci = vs.get("ci") or (None, None)
    return [csv_cell(ci[0]), csv_cell(ci[1]), csv_cell(vs.get("diff")), csv_cell(vci[0]), csv_cell(vci[1])]


def position_bands(curves: dict[str, list[dict]], scale: float = 1.0) -> dict[str, list]:
    """`write_position_png`'s bands from results.json bins: name -> [(bin_start_s, bin_end_s, ci scaled)].

    Args:
        curves: name -> its bins (with `ci` where intervals were drawn).
        scale: what the plotted value is multiplied by (100 for WER in %).
    """
    return {name: [(b["bin_start_s"], b["bin_end_s"], None if not b.get("ci") else [scale * v for v in b["ci"]])
                   for b in bins] for name, bins in curves.items()}


def write_position_png(path: Path, series: dict[str, list[tuple[float, float, float | None]]], ylabel: str,
                       title: str, labels: dict[str, str] | None = None, where: str = "document",
                       bands: dict[str, list[tuple[float, float, list[float] | None]]] | None = None) -> Path:
    """A value vs position plot, one line per series (matplotlib, Agg backend), checked as a PNG after writing.

    Args:
        path: where to write.
        series: name -> [(bin_start_s, bin_end_s, value or None)], drawn at the bin centres.
        ylabel, title: axis label and title.
        labels: legend text per name (default the name).
        where: what the position is in ("document", "recording").
        bands: name -> [(bin_start_s, bin_end_s, [low, high] or None)]: the 95% intervals, shaded in the
            series' colour (a bin without one leaves a gap).
    """
    ends = [e for pts in series.values() for _, e, _ in pts]
    scale, unit = (60.0, "min") if ends and max(ends) >= 600 else (1.0, "s")
    fig, ax = pyplot().subplots(figsize=(8, 4.5), dpi=120)
    styles = ("-", "--", "-.", ":")  # overlapping curves (e.g. document and never) stay visible
    shaded = False
    for n, (name, pts) in enumerate(series.items()):
        xy = [((a + b) / 2 / scale, v) for a, b, v in pts if v is not None]
        if not xy:
            continue
        xs, ys = zip(*xy)
        line, = ax.plot(xs, ys, linestyle=styles[n % len(styles)], marker="o" if len(xs) < 30 else None,
                        markersize=3, linewidth=1.5, label=(labels or {}).get(name, name))
        band = [((a + b) / 2 / scale, ci) for a, b, ci in (bands or {}).get(name, [])]
        if any(ci for _, ci in band):
            x = np.array([c for c, _ in band])
            lo, hi = (np.array([np.nan if ci is None else ci[j] for _, ci in band]) for j in (0, 1))
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0, where=~np.isnan(lo))
            shaded = True
    ax.set_xlabel(f"position in {where} ({unit}, bin centre)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="policy (shaded: 95% interval)" if shaded else "policy", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
