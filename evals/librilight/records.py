"""What results.json and the resume record keep about documents: files, skips, inputs, carried fast weights."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ttt_cli.io import atomic_write

from ..inputs import digest_or_none, rel_path
from ..resume import CARRY_PREFIX, state_dir
from .codes_cache import DocumentCodes
from .data import Document, SkippedDocument


def doc_record(doc: Document, dc: DocumentCodes, root: Path) -> dict:
    """results.json's entry of a scored document: its files (where each sits, metadata), skips, length.

    Args:
        doc: the document.
        dc: its codes (the files actually encoded).
        root: the dataset's root (paths are written relative to it).
    """
    meta = {str(f.path): f for f in doc.files}
    files = []
    for f in dc.files:
        e = {"path": rel_path(f.path, root), "start_s": f.start_s, "end_s": f.end_s, "start_step": f.start_step,
             "end_step": f.end_step}
        if f.truncated:
            e["truncated"] = True
        if f.warnings:
            e["warnings"] = list(f.warnings)
        src = meta.get(f.path)
        if src is not None and src.meta:
            e["meta"] = src.meta
        if src is not None and src.meta_error:
            e["meta_error"] = src.meta_error
        files.append(e)
    skipped = [{"path": rel_path(s.path, root), "reason": s.reason, "failed": s.failed}
               for s in doc.skipped + dc.skipped]
    return {"id": doc.id, "speaker": doc.speaker, "book": doc.book, "title": doc.title(),
            "seconds": dc.seconds, "steps": dc.steps, "files": files, "skipped": skipped,
            "codes_cache_hit": dc.cache_hit}


def skipped_doc(s: SkippedDocument, root: Path) -> dict:
    """results.json's entry of a book left out, its files' paths relative to the dataset root.

    Args:
        s: the book left out.
        root: the dataset's root.
    """
    d = s.to_dict()
    d["skipped"] = [{"path": rel_path(f["path"], root), "reason": f["reason"], "failed": f["failed"]}
                    for f in d["skipped"]]
    return d


def document_inputs(doc: Document, dc: DocumentCodes, root: Path) -> dict:
    """A finished document's inputs for the resume record: every audio path of its book, and the content hash
    of each file read.

    Args:
        doc: the document.
        dc: its codes (the files read, and the digests the codes cache took already).
        root: the dataset's root.
    """
    all_paths = doc.all_paths()
    paths = [rel_path(p, root) for p in all_paths] + [rel_path(s.path, root) for s in doc.skipped]
    known = {str(all_paths[e["index"]]): e["sha256"] for e in dc.inputs}  # hashed for the codes cache already
    read = [f.path for f in dc.files] + [s.path for s in dc.skipped if s.failed]
    digests = {rel_path(p, root): known.get(str(p)) or digest_or_none(Path(p)) for p in read}
    return {"paths": sorted(paths), "sha256": digests}


def inputs_changed(entry: dict, doc: Document, root: Path) -> str | None:
    """Why a finished document must be computed again (its files or their contents changed), or None.

    Args:
        entry: its resume entry.
        doc: the document as discovered now.
        root: the dataset's root.
    """
    rec = entry.get("inputs") or {}
    now = sorted([rel_path(p, root) for p in doc.all_paths()] + [rel_path(s.path, root) for s in doc.skipped])
    if rec.get("paths") != now:
        added = sorted(set(now) - set(rec.get("paths") or []))
        gone = sorted(set(rec.get("paths") or []) - set(now))
        parts = [f"{what} {', '.join(names[:3])}" for what, names in (("added", added), ("removed", gone)) if names]
        return f"its files changed ({'; '.join(parts)})"
    changed = [r for r, d in (rec.get("sha256") or {}).items() if digest_or_none(root / r) != d]
    if changed:
        return f"its audio changed ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})"
    return None


def carry_path(out: Path, policy_dir: str) -> Path:
    """Where a `never` policy's carried fast weights are kept.

    Args:
        out: --out.
        policy_dir: the policy's directory name.
    """
    return state_dir(out) / f"{CARRY_PREFIX}{policy_dir}.safetensors"


def save_carry(path: Path, carry: dict, after: str) -> None:
    """The fast weights a `never` policy carries into the next document, and the document they follow.

    Args:
        path: `carry_path`.
        carry: {layer: tensors as captured}.
        after: the id of the document they follow.
    """
    flat = {f"layers.{i}.{k}": v.contiguous() for i, t in carry.items() for k, v in t.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata={"after": json.dumps(after)}))


def load_carry(path: Path) -> tuple[dict, str | None]:
    """(carried tensors by layer, the id of the document they follow), or ({}, None) if unreadable.

    Args:
        path: `carry_path`.
    """
    out: dict[int, dict] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            after = json.loads((f.metadata() or {}).get("after", "null"))
            for k in f.keys():
                _, i, name = k.split(".", 2)
                out.setdefault(int(i), {})[name] = f.get_tensor(k)
    except Exception:  # damaged: the caller recomputes
        return {}, None
    return out, after
