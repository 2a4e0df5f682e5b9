"""What every eval writes the same way: results.json (checked after writing) and the value-vs-position plot."""

from __future__ import annotations

import json
from pathlib import Path

from ttt_cli.io import shown, write_json
from ttt_cli.outputs import json_with_keys
from ttt_cli.tables import pyplot, save_png

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


def write_position_png(path: Path, series: dict[str, list[tuple[float, float, float | None]]], ylabel: str,
                       title: str, labels: dict[str, str] | None = None, where: str = "document") -> Path:
    """A value vs position plot, one line per series (matplotlib, Agg backend), checked as a PNG after writing.

    Args:
        path: where to write.
        series: name -> [(bin_start_s, bin_end_s, value or None)], drawn at the bin centres.
        ylabel, title: axis label and title.
        labels: legend text per name (default the name).
        where: what the position is in ("document", "recording").
    """
    ends = [e for pts in series.values() for _, e, _ in pts]
    scale, unit = (60.0, "min") if ends and max(ends) >= 600 else (1.0, "s")
    fig, ax = pyplot().subplots(figsize=(8, 4.5), dpi=120)
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
