"""Writers of `ttt eval librilight` outputs, one per format: results.json, curve.csv, curve.png, token NLL files."""

from __future__ import annotations

import csv
import io
import json
import math
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


def _cell(v) -> str:
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
            rows.append([name, _cell(b["bin_start_s"]), _cell(b["bin_end_s"]), _cell(b["nll"]),
                         _cell(b["nll_semantic"]), _cell(b["nll_acoustic"]), str(b["tokens"])])
    return rows


def write_curve_csv(path: Path, policies: dict) -> Path:
    """curve.csv: one row per policy and position bin, columns `CURVE_COLUMNS` (empty cell: no token)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CURVE_COLUMNS)
    rows = curve_rows(policies)
    w.writerows(rows)
    atomic_write(path, lambda p: p.write_text(buf.getvalue()))
    with open(path, newline="") as f:
        back = list(csv.reader(f))
    if back[0] != list(CURVE_COLUMNS) or len(back) != len(rows) + 1:
        raise OSError(f"{path} does not read back as written.")
    return Path(path)


def write_curve_png(path: Path, policies: dict, title: str) -> Path:
    """curve.png: NLL vs position in the document, one line per policy (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    ends = [b["bin_end_s"] for p in policies.values() for b in p["curve"]]
    scale, unit = (60.0, "min") if ends and max(ends) >= 600 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    styles = ("-", "--", "-.", ":")  # overlapping curves (e.g. document and never) stay visible
    for n, (name, p) in enumerate(policies.items()):
        pts = [((b["bin_start_s"] + b["bin_end_s"]) / 2 / scale, b["nll"]) for b in p["curve"] if b["nll"] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, linestyle=styles[n % len(styles)], marker="o" if len(xs) < 30 else None, markersize=3,
                linewidth=1.5,
                label=f"{name} (mean {p['nll']:.3f})" if p.get("nll") is not None else name)
    ax.set_xlabel(f"position in document ({unit}, bin centre)")
    ax.set_ylabel("NLL (nats per audio token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="policy", fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            raise OSError(f"{path} is not a PNG after writing.")
    return Path(path)


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
