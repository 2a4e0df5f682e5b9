"""The update series on disk (SPEC §3.7, `--telemetry DIR`): recording on a model, one CSV and one PNG per file."""

from __future__ import annotations

import contextlib
import csv
import typing as tp
from pathlib import Path

from .fastweights.attach import ttt_layers
from .outputs import beside
from .tables import pyplot, save_png, write_table_csv
from .units import FRAME_RATE

COLUMNS = ("event", "stream", "layer", "update", "step", "time_s", "tokens", "delta_norm", "clip_scale",
           "step_norm", "drift", "w_norm")
CSV_SUFFIX = ".updates.csv"
PNG_SUFFIX = ".updates.png"
FLAG = "--telemetry"

Rows = dict  # {layer index: [UpdateRow, ...]} of one stream


@contextlib.contextmanager
def recording(lm, on: bool = True) -> tp.Iterator[None]:
    """Streams started inside gather the update series of every fast-weight layer (then as before);
    `on=False` changes nothing.

    Args:
        lm: moshi LMModel with fast-weight layers.
        on: record (False: a no-op, so callers need no branch).
    """
    if not on:
        yield
        return
    layers = ttt_layers(lm)
    before = {i: layer.recording for i, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.set_recording(on)
        yield
    finally:
        for i, layer in layers.items():
            layer.recording = before[i]


@contextlib.contextmanager
def paused(lm) -> tp.Iterator[None]:
    """Updates made inside are not rows of the series (e.g. export-state's `--flush-partial` on a copy).

    Args:
        lm: moshi LMModel with fast-weight layers.
    """
    recs = [r for r in (layer.recorder() for layer in ttt_layers(lm).values()) if r is not None]
    for r in recs:
        r.paused = True
    try:
        yield
    finally:
        for r in recs:
            r.paused = False


def take_rows(lm, batch_index: int) -> Rows:
    """Every layer's rows of stream `batch_index` since the last call (its file): one device read per layer.

    Args:
        lm: moshi LMModel with fast-weight layers, recording.
        batch_index: the stream.
    """
    return {i: layer.take_updates(batch_index) for i, layer in ttt_layers(lm).items()}


def series_paths(directory: Path, name: str) -> dict[str, Path]:
    """`DIR/<name>.updates.csv` and `.png`.

    Args:
        directory: --telemetry DIR.
        name: the file's name in it, without suffix (`eval_series_name` for eval).
    """
    return {"csv": Path(directory) / f"{name}{CSV_SUFFIX}", "png": Path(directory) / f"{name}{PNG_SUFFIX}"}


def eval_series_name(policy_dir: str, doc_id: str) -> str:
    """`<policy dir>/<document id, / as _>` (SPEC §3.7).

    Args:
        policy_dir: the policy's directory name (`Policy.dir_name`).
        doc_id: the document id (`<speaker>/<book>`).
    """
    return f"{policy_dir}/{doc_id.replace('/', '_')}"


def csv_rows(rows: Rows, stream: int) -> list[list[str]]:
    """CSV rows in time order (then layer; a layer's events keep their order), floats as Python `repr`.

    Args:
        rows: {layer: [UpdateRow]} of one stream.
        stream: the stream's index, written in the `stream` column.
    """
    flat = [(r.step, i, n, r) for i, rs in rows.items() for n, r in enumerate(rs)]
    flat.sort(key=lambda x: (x[0], x[1], x[2]))
    return [[r.event, str(stream), str(i), str(r.update), str(r.step), repr(r.step / FRAME_RATE), str(r.tokens),
             repr(float(r.delta_norm)), repr(float(r.clip_scale)), repr(float(r.step_norm)), repr(float(r.drift)),
             repr(float(r.w_norm))] for _, i, _, r in flat]


def is_series_csv(path: Path) -> bool:
    """An update-series CSV of ours: its header is exactly `COLUMNS` (what --overwrite may replace).

    Args:
        path: the file to look at.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == list(COLUMNS)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def plan_series(plan, paths: dict[str, Path], what: str) -> None:
    """Declares one file's series on an `OutputPlan` (refusals and --overwrite as for every output).

    Args:
        plan: the command's `ttt_cli.outputs.OutputPlan`.
        paths: `series_paths` of the file.
        what: the file, as messages name it.
    """
    plan.write(paths["csv"], FLAG, f"the update series of {what}", is_series_csv)
    plan.write(paths["png"], FLAG, f"the update-series plot of {what}", beside(paths["csv"], is_series_csv))


def write_series(paths: dict[str, Path], rows: Rows, stream: int, title: str) -> dict[str, str]:
    """Writes the CSV and the PNG of one stream's file, each atomically; returns {"csv", "png"} paths.

    Args:
        paths: `series_paths` of the file.
        rows: {layer: [UpdateRow]} of the stream.
        stream: the stream's index.
        title: the plot's title.
    """
    write_table_csv(paths["csv"], COLUMNS, csv_rows(rows, stream))
    write_series_png(paths["png"], rows, title)
    return {k: str(v) for k, v in paths.items()}


def write_series_png(path: Path, rows: Rows, title: str) -> Path:
    """Drift and step norm vs time, one line per layer; resets as dotted verticals, non-finite events as ×.

    Args:
        path: where to write.
        rows: {layer: [UpdateRow]} of the stream.
        title: the plot's title.
    """
    fig, (ax_d, ax_s) = pyplot().subplots(2, 1, figsize=(8, 5.5), dpi=110, sharex=True)
    any_update = False
    for n, (i, rs) in enumerate(sorted(rows.items())):
        color = f"C{n % 10}"
        ups = [r for r in rs if r.event == "update"]
        if ups:
            any_update = True
            t = [r.step / FRAME_RATE for r in ups]
            mark = "o" if len(ups) < 40 else None
            ax_d.plot(t, [r.drift for r in ups], color=color, marker=mark, markersize=3, label=f"layer {i}")
            ax_s.plot(t, [r.step_norm for r in ups], color=color, marker=mark, markersize=3, label=f"layer {i}")
        for r in rs:
            if r.event == "reset":
                for ax in (ax_d, ax_s):
                    ax.axvline(r.step / FRAME_RATE, color=color, linestyle=":", linewidth=1, alpha=0.7)
            elif r.event == "nonfinite":
                ax_s.plot([r.step / FRAME_RATE], [0.0], "x", color="red", markersize=8)
    ax_d.set_ylabel("drift ‖W−W0‖/‖W0‖")
    ax_s.set_ylabel("step norm ‖W_after−W_before‖")
    ax_s.set_xlabel("time in file (s)   ·   dotted: reset   ×: non-finite update (reset)")
    for ax in (ax_d, ax_s):
        ax.grid(True, alpha=0.3)
    if any_update:
        ax_d.legend(fontsize=8)
    else:
        ax_d.text(0.5, 0.5, "no fast-weight update in this file", transform=ax_d.transAxes, ha="center")
    ax_d.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_png(fig, path)
