"""Resume records of `ttt eval` (librilight, asr): what finished, verified before it is trusted (SPEC §6, §7.1)."""

from __future__ import annotations

import hashlib
import json
import shutil
import typing as tp
from pathlib import Path

from ttt_cli.distributed import RANKS_DIR
from ttt_cli.errors import ConfigError
from ttt_cli.io import write_text
from ttt_cli.outputs import is_temporary

# The record (`OUT/.ttt-eval/state.json`) holds the run's configuration, named by the options that
# set it, and per finished document (eval asr: recording) its results, the paths and content hashes
# of its inputs and a checksum of the entry. `--resume` refuses a configuration that differs (naming
# the options), and recomputes, with a note, a document whose record is damaged or whose inputs changed.
STATE_DIR = ".ttt-eval"        # resume state inside --out
STATE_FILE = "state.json"
STATE_VERSION = 2              # 2: configuration by option, per-document input hashes and checksums
CARRY_PREFIX = "carry-"       # <prefix><policy dir>.safetensors: what a `never` policy carries (evals.librilight)
RANK_RECORD_PREFIX = "eval-"   # OUT/.ranks/<rank>/eval-<hash of the id>.json: one finished document (torchrun)

# What `--resume` must find unchanged in the model section, by the option that sets it (each task
# names its own protocol keys: `run_config`'s `flags`).
MODEL_FLAGS = {"id": "--model", "fingerprint": "--model (its TTT weights)", "dtype": "--dtype"}
TTT_FLAGS = {"lr": "--ttt-lr / --no-ttt", "layers": "--ttt-layers", "chunk_size": "--ttt-chunk-size",
             "delta_clip_fro_norm": "--ttt-clip"}


def state_dir(out: Path) -> Path:
    """`OUT/.ttt-eval`, the resume record's folder.

    Args:
        out: --out.
    """
    return Path(out) / STATE_DIR


def write_state(sdir: Path, state: dict) -> None:
    """Writes the resume state atomically into `sdir` (`state_dir(out)`).

    Args:
        sdir: the resume record's folder.
        state: the state (`new_state`, `with_document`).
    """
    # ASCII escapes keep file names that are not UTF-8 exact (surrogate escapes survive a round trip).
    write_text(sdir / STATE_FILE, json.dumps(state, indent=1, ensure_ascii=True) + "\n")


def state_dir_is_ours(sdir: Path) -> bool:
    """The resume directory holds only what `ttt eval` writes there (so --overwrite may remove it).

    Args:
        sdir: the resume record's folder.
    """
    try:
        names = [p.name for p in sdir.iterdir()]
    except OSError:
        return False
    return all(n == STATE_FILE or (n.startswith(CARRY_PREFIX) and n.endswith(".safetensors")) or is_temporary(n)
               for n in names)


# -- per-rank records (scale-out, SPEC §5.6) -------------------------------------------------------

def ranks_dir(out: Path) -> Path:
    """`OUT/.ranks`, where ranks under torchrun record their finished documents.

    Args:
        out: --out.
    """
    return Path(out) / RANKS_DIR


def rank_record_path(out: Path, rank: int, doc_id: str) -> Path:
    """Where rank `rank` records one finished document (a name from the id's hash: ids hold slashes).

    Args:
        out: --out.
        rank: the rank.
        doc_id: the document's id.
    """
    h = hashlib.sha256(doc_id.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return ranks_dir(out) / str(rank) / f"{RANK_RECORD_PREFIX}{h}.json"


def write_rank_record(out: Path, rank: int, doc_id: str, entry: dict, config: dict) -> Path:
    """Writes one finished document of a rank atomically: the run's config and the checksummed entry.

    Args:
        out: --out.
        rank: the rank.
        doc_id: the document's id.
        entry: its resume entry.
        config: the run's `run_config`.
    """
    rec = {"version": STATE_VERSION, "config": config, "doc_id": doc_id,
           "entry": {**entry, "checksum": checksum(entry)}}
    path = rank_record_path(out, rank, doc_id)
    # ASCII escapes keep file names that are not UTF-8 exact, as in the state file.
    write_text(path, json.dumps(rec, indent=1, ensure_ascii=True) + "\n")
    return path


def read_rank_records(out: Path) -> tuple[list[dict], list[str]]:
    """Every rank's records under `OUT/.ranks/` (whatever the world size that wrote them), and notes on
    the ones that cannot be read (their documents are computed again).

    Args:
        out: --out.
    """
    root, records, notes = ranks_dir(out), [], []
    if not root.is_dir():
        return [], []
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        for f in sorted(d.iterdir(), key=lambda p: p.name):
            if is_temporary(f.name):
                continue
            try:
                rec = json.loads(f.read_text(encoding="utf-8"))
                if not (isinstance(rec, dict) and rec.get("version") == STATE_VERSION and isinstance(rec.get("entry"),
                        dict) and isinstance(rec.get("doc_id"), str)):
                    raise ValueError("not a record of this ttt")
            except (OSError, ValueError) as e:
                notes.append(f"--resume: the record {f} cannot be used ({e}); its document is computed again.")
                continue
            records.append(rec)
    return records, notes


def ranks_dir_is_ours(root: Path) -> bool:
    """`OUT/.ranks` holds only what ranks of `ttt eval` write there (so it may be merged and removed).

    Args:
        root: `ranks_dir(out)`.
    """
    try:
        for d in root.iterdir():
            if not (d.is_dir() and d.name.isdigit()):
                return False
            if not all((f.name.startswith(RANK_RECORD_PREFIX) and f.name.endswith(".json")) or is_temporary(f.name)
                       for f in d.iterdir()):
                return False
    except OSError:
        return False
    return True


def remove_ranks(out: Path) -> None:
    """Removes `OUT/.ranks` once its records are in the state file (checked to be ours by the caller).

    Args:
        out: --out.
    """
    root = ranks_dir(out)
    if root.is_dir():
        shutil.rmtree(root)


def merge_records(state: dict, records: list[dict], order: list[str]) -> tuple[dict, list[str]]:
    """The state with the document of every record made with the state's config added, and the ids of
    records left out because their checksum fails (damaged: computed again). Finished documents are
    put in dataset order, the order in which a single process sums them.

    Args:
        state: the resume state.
        records: `read_rank_records`'s records.
        order: every document id of the dataset, in order.
    """
    docs, done, damaged = dict(state["docs"]), list(state["done"]), []
    for rec in records:
        entry = rec["entry"]
        if rec.get("config") != state.get("config"):
            continue
        if entry.get("checksum") != checksum(entry):
            damaged.append(rec["doc_id"])
            continue
        docs[rec["doc_id"]] = entry
        if rec["doc_id"] not in done:
            done.append(rec["doc_id"])
    rank = {d: i for i, d in enumerate(order)}
    done.sort(key=lambda d: rank.get(d, len(order)))
    return {**state, "done": done, "docs": docs}, damaged


# -- configuration -------------------------------------------------------------------------------

def run_config(protocol: dict, model: dict, flags: tp.Mapping[str, str]) -> dict:
    """The run's configuration as {option: value}, for the record and for naming differences.

    Args:
        protocol: the protocol section of results.json.
        model: the model section.
        flags: {protocol key: the option that sets it} of what must not change (the task's).
    """
    cfg: dict[str, tp.Any] = {}
    for k, flag in flags.items():
        v = protocol.get(k)
        if k == "policies":
            v = sorted(v or [])
        elif k == "init_state" and isinstance(v, dict):
            v = v.get("sha256")  # the snapshot's content, wherever it lies
        cfg[flag] = v
    for k, flag in MODEL_FLAGS.items():
        cfg[flag] = model.get(k)
    ttt = model.get("ttt") or {}
    for k, flag in TTT_FLAGS.items():
        cfg[flag] = ttt.get(k)
    cfg["TTT settings (other)"] = {k: v for k, v in sorted(ttt.items()) if k not in TTT_FLAGS}
    return json.loads(json.dumps(cfg, default=str))


def config_differences(old: dict, new: dict) -> list[str]:
    """`option: was X, now Y` for every option that differs.

    Args:
        old: the recorded `run_config`.
        new: this run's.
    """
    def fmt(v: tp.Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "none"
        if isinstance(v, str) and len(v) == 64:
            return v[:12]  # a digest
        return "none" if v is None else str(v)
    return [f"{k}: was {fmt(old.get(k))}, now {fmt(new.get(k))}" for k in new if old.get(k) != new.get(k)] + \
           [f"{k}: was {fmt(old[k])}, now not set" for k in old if k not in new]


# -- per-document records ------------------------------------------------------------------------

def checksum(entry: dict) -> str:
    """sha256 of a document's entry without its `checksum` key (what the record checks before trusting it).

    Args:
        entry: a resume entry.
    """
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def with_document(state: dict, doc_id: str, entry: dict) -> dict:
    """A copy of the state with one more finished document (its entry checksummed); the caller
    keeps it once it is written, so the state in memory never claims more than the disk holds.

    Args:
        state: the resume state.
        doc_id: the document's id.
        entry: its resume entry.
    """
    entry = {**entry, "checksum": checksum(entry)}
    done = state["done"] + ([] if doc_id in state["done"] else [doc_id])
    return {**state, "done": done, "docs": {**state["docs"], doc_id: entry}}


def new_state(config: dict) -> dict:
    """An empty resume state.

    Args:
        config: the run's `run_config`.
    """
    return {"version": STATE_VERSION, "config": config, "done": [], "docs": {}}


def open_state(out: Path, config: dict, dataset, carrying: bool,
               changed: tp.Callable[[dict, tp.Any], str | None]) -> tuple[dict, list[str]]:
    """The resume state of the run in `out`, verified against `config` and the dataset.

    Finished documents are those of the state file and of every rank's records under
    `OUT/.ranks/` (a run under torchrun, with any number of processes).

    Args:
        out: --out.
        config: this run's `run_config`.
        dataset: the discovered dataset (its documents in order).
        carrying: a policy carries fast weights across documents (`never`), so a document recomputed
            in the middle invalidates every later one.
        changed: (entry, document) -> why a finished document must be computed again (its inputs
            changed), or None: the task's rule.
    Returns:
        (state, notes): finished documents that may be kept, and what was recomputed and why.
    Raises:
        ConfigError: the configuration differs (the message names the options).
    """
    path = state_dir(out) / STATE_FILE
    records, notes = read_rank_records(out)
    try:
        old = _read_state(path, records)
    except (OSError, ValueError) as e:
        return new_state(config), notes + [f"--resume: the resume record {path} cannot be used ({e}); every "
                                           f"document is computed again."]
    foreign = [r["doc_id"] for r in records if r.get("config") != old.get("config")]
    if foreign:
        notes.append(f"--resume: {len(foreign)} record(s) under {ranks_dir(out)} were made with other options "
                     f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); computed again.")
    old, damaged = merge_records({**old, "done": list(old.get("done", []))}, records,
                                 [d.id for d in dataset.documents])
    notes += [f"--resume: {d}: its record under {ranks_dir(out)} is damaged; computed again." for d in damaged]
    diff = config_differences(old.get("config") or {}, config)
    if diff:
        raise ConfigError(f"--resume: the run in {out} was made with other options: {'; '.join(diff)}. Pass the "
                          f"same options to continue it, or --overwrite to start again.",
                          hint="pass the options of the interrupted run, or --overwrite")
    state, kept_notes = _kept(old, new_state(config), dataset, carrying, changed)
    return state, notes + kept_notes


def _read_state(path: Path, records: list[dict]) -> dict:
    """The state file's content (rebuilt from the ranks' records when only they exist); raises OSError or
    ValueError when it cannot be used."""
    if not path.is_file() and records:  # the state file is written first; records alone: rebuild from them
        old = {"version": STATE_VERSION, "config": records[0]["config"], "done": [], "docs": {}}
    else:
        old = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(old, dict) or old.get("version") != STATE_VERSION or not isinstance(old.get("docs"), dict):
        raise ValueError(f"format {old.get('version') if isinstance(old, dict) else '?'}")
    return old


def _kept(old: dict, state: dict, dataset, carrying: bool,
          changed: tp.Callable[[dict, tp.Any], str | None]) -> tuple[dict, list[str]]:
    """`state` with the finished documents of `old` that may be kept, and notes on the others (damaged,
    gone from the dataset, changed); a carrying policy keeps them only as the dataset's first ones in order."""
    config, notes = state["config"], []
    docs = {d.id: d for d in dataset.documents}
    dropped = False
    for doc_id in old.get("done", []):
        entry = old["docs"].get(doc_id)
        why = None
        if not isinstance(entry, dict) or entry.get("checksum") != checksum(entry):
            why = "its resume record is damaged"
        elif doc_id not in docs:
            notes.append(f"--resume: {doc_id} is no longer part of the dataset; its results are dropped.")
            dropped = True
            continue
        else:
            why = changed(entry, docs[doc_id])
        if why:
            notes.append(f"--resume: {doc_id}: {why}; computed again.")
            dropped = True
            continue
        state["docs"][doc_id] = entry
        state["done"].append(doc_id)
    order = [d.id for d in dataset.documents]
    if carrying and state["done"] and (dropped or state["done"] != order[:len(state["done"])]):
        notes.append("--resume: a policy carries fast weights across documents (never) and the finished documents "
                     "are no longer the first ones of the dataset in order; every document is computed again.")
        state = new_state(config)
    return state, notes
