"""LibriLight-style dataset discovery: DATA/<speaker>/<book>/<file>.<ext>, natural order, documents (SPEC §6)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.audio import AUDIO_EXTENSIONS
from ttt_cli.errors import ConfigError

from ..inputs import SkippedFile, natural_key, probe_seconds

# Metadata keys of LibriLight's per-file JSON kept in results; `voice_activity` is summarised.
META_KEYS = ("speaker", "snr", "book_meta")
BOOK_META_KEYS = ("id", "title", "authors", "language", "totaltimesecs", "url_librivox")


@dataclass
class AudioFile:
    """One audio file of a book, before decoding."""

    path: Path
    seconds: float               # from the file header (decoding later gives the exact length)
    meta: dict | None = None     # LibriLight JSON metadata (summarised), when the file has one
    meta_error: str | None = None


@dataclass
class Document:
    """One book: its files in natural order, cut at --max-seconds later, at encoding time."""

    id: str                      # <speaker>/<book>
    speaker: str
    book: str
    files: list[AudioFile]       # readable files up to the --max-seconds cut by their headers' durations
    skipped: list[SkippedFile] = field(default_factory=list)
    # Files after that cut, in order: encoding takes them when the files before decode shorter than
    # their headers say (a truncated file must not make later files vanish), else lists them as cut.
    after_cut: list[Path] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.files)

    def all_paths(self) -> list[Path]:
        """Every audio file of the book in order: `files`, then those after the cut."""
        return [f.path for f in self.files] + list(self.after_cut)

    def title(self) -> str | None:
        for f in self.files:
            t = ((f.meta or {}).get("book_meta") or {}).get("title")
            if t:
                return str(t)
        return None


@dataclass
class SkippedDocument:
    """A book left out: by an option (too short, beyond --limit-books) or with no readable file; `files`
    accounts for each of its audio files (with `failed` set where the file itself is bad)."""

    id: str
    reason: str
    files: list[SkippedFile] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(f.failed for f in self.files)

    def to_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason, "skipped": [f.to_dict() for f in self.files]}


@dataclass
class Dataset:
    """What discovery found: documents to score, and what it left out and why."""

    root: Path
    documents: list[Document]
    skipped_documents: list[SkippedDocument]
    stray_files: list[SkippedFile]  # audio outside the <speaker>/<book>/ layout

    @property
    def failed_files(self) -> list[SkippedFile]:
        """Files found but not usable: stray, and unreadable ones of dropped books (those of kept
        books are in their `skipped` lists)."""
        return [f for f in self.stray_files + [f for d in self.skipped_documents for f in d.files] if f.failed]


def _summarise_meta(raw: dict) -> dict:
    out = {k: raw[k] for k in META_KEYS if k in raw and k != "book_meta"}
    if isinstance(raw.get("book_meta"), dict):
        out["book_meta"] = {k: raw["book_meta"][k] for k in BOOK_META_KEYS if k in raw["book_meta"]}
    va = raw.get("voice_activity")
    if isinstance(va, list):
        try:
            out["voice_activity_segments"] = len(va)
            out["voice_activity_seconds"] = round(sum(float(b) - float(a) for a, b in va), 3)
        except (TypeError, ValueError):
            out["voice_activity_segments"] = len(va)
    return out


def read_metadata(audio: Path) -> tuple[dict | None, str | None]:
    """The `<file>.json` next to an audio file: (summary, None), (None, None) if absent, (None, error).

    Args:
        audio: the audio file.
    """
    p = audio.with_suffix(".json")
    if not p.is_file():
        return None, None
    try:
        raw = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{p}: unreadable metadata ({e})"
    if not isinstance(raw, dict):
        return None, f"{p}: metadata is not a JSON object"
    return _summarise_meta(raw), None


def _listing(d: Path) -> list[Path] | str:
    """The entries of directory `d`, or why it cannot be listed (its files are then reported, not lost)."""
    try:
        return list(d.iterdir())
    except OSError as e:
        return f"a directory that cannot be listed ({e.strerror or e}): its audio files cannot be read"


def _audio_files(entries: list[Path]) -> list[Path]:
    # Anything with an audio name but a directory is an input: a FIFO or a broken link is then reported.
    return [p for p in entries if not p.is_dir() and p.suffix.lower() in AUDIO_EXTENSIONS
            and not p.name.startswith(".")]


def _subdirs(entries: list[Path]) -> list[Path]:
    return sorted((p for p in entries if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def _nested_audio(book_entries: list[Path]) -> list[Path]:
    """Audio files in subdirectories of a book directory (not part of the layout: reported as stray)."""
    out: list[Path] = []
    for d in _subdirs(book_entries):
        try:
            for dirpath, dirnames, filenames in os.walk(d):
                dirnames[:] = sorted((n for n in dirnames if not n.startswith(".")), key=natural_key)
                out += [Path(dirpath) / n for n in sorted(filenames, key=natural_key)
                        if Path(n).suffix.lower() in AUDIO_EXTENSIONS and not n.startswith(".")]
        except OSError:
            continue
    return out


def _document(doc_id: str, speaker: str, book: str, paths: list[Path], max_seconds: float | None) -> Document:
    """A book's document: its readable files up to the cut by header durations, the others after it."""
    doc = Document(doc_id, speaker, book, [])
    total = 0.0
    for n, p in enumerate(paths):
        if max_seconds is not None and total >= max_seconds:
            doc.after_cut = paths[n:]  # decided again at encoding, on the decoded lengths
            break
        try:
            sec = probe_seconds(p)
        except (ValueError, OSError) as e:
            doc.skipped.append(SkippedFile(str(p), str(e)))
            continue
        meta, meta_err = read_metadata(p)
        doc.files.append(AudioFile(p, sec, meta, meta_err))
        total += sec
    return doc


def _walk(top: list[Path], max_seconds: float | None,
          min_seconds: float) -> tuple[list[Document], list[SkippedDocument], list[SkippedFile], bool]:
    """The books below DATA's entries `top`: (documents, books left out, stray files and folders that cannot
    be listed, whether audio lies deeper than the layout)."""
    stray = [SkippedFile(str(p), "not inside a <speaker>/<book>/ directory") for p in
             sorted(_audio_files(top), key=lambda p: natural_key(p.name))]
    documents: list[Document] = []
    skipped_docs: list[SkippedDocument] = []
    deeper = False
    for spk in _subdirs(top):
        in_spk = _listing(spk)
        if isinstance(in_spk, str):
            stray.append(SkippedFile(str(spk), in_spk))
            continue
        stray += [SkippedFile(str(p), "not inside a <speaker>/<book>/ directory")
                  for p in sorted(_audio_files(in_spk), key=lambda p: natural_key(p.name))]
        for book in _subdirs(in_spk):
            doc_id = f"{spk.name}/{book.name}"
            in_book = _listing(book)
            if isinstance(in_book, str):
                skipped_docs.append(SkippedDocument(doc_id, in_book, [SkippedFile(str(book), in_book)]))
                continue
            nested = _nested_audio(in_book)
            stray += [SkippedFile(str(p), "nested below a <speaker>/<book>/ directory") for p in nested]
            paths = sorted(_audio_files(in_book), key=lambda p: natural_key(p.name))
            deeper = deeper or bool(nested)
            if not paths:
                continue
            doc = _document(doc_id, spk.name, book.name, paths, max_seconds)
            if not doc.files:
                skipped_docs.append(SkippedDocument(doc_id, "no readable audio file", doc.skipped))
                continue
            if doc.seconds < min_seconds and not doc.after_cut:
                reason = f"{doc.seconds:.1f} s is shorter than --min-seconds {min_seconds:g}"
                skipped_docs.append(SkippedDocument(doc_id, reason, doc.skipped + [
                    SkippedFile(str(f.path), f"its book is shorter than --min-seconds {min_seconds:g}", False)
                    for f in doc.files]))
                continue
            documents.append(doc)
    return documents, skipped_docs, stray, deeper


def discover(root: Path | str, max_seconds: float | None = None, min_seconds: float = 0.0,
             limit_books: int | None = None) -> Dataset:
    """Finds the books of a LibriLight-style directory.

    Args:
        root: DATA, holding `<speaker>/<book>/<file>.<ext>` (+ optional `<file>.json`).
        max_seconds: documents are cut there later; files that start after the cut are left out now.
        min_seconds: books shorter than this (sum of readable files) are dropped.
        limit_books: keep only the first N documents (natural order of `<speaker>/<book>`).
    Raises:
        ConfigError: DATA is missing, not a directory, cannot be listed, or holds no usable book.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ConfigError(f"dataset directory {root} does not exist.")
    if not root.is_dir():
        raise ConfigError(f"{root} is a file; DATA must be a directory laid out as <speaker>/<book>/<file>.flac.")
    if max_seconds is not None and max_seconds <= 0:
        raise ConfigError(f"--max-seconds must be > 0, got {max_seconds}.")
    if min_seconds < 0 or (max_seconds is not None and min_seconds > max_seconds):
        raise ConfigError(f"--min-seconds {min_seconds} must be >= 0 and <= --max-seconds {max_seconds}.")
    if limit_books is not None and limit_books < 1:
        raise ConfigError(f"--limit-books must be >= 1, got {limit_books}.")
    try:
        top = list(root.iterdir())
    except OSError as e:
        raise ConfigError(f"cannot read the dataset directory {root} ({e.strerror or e}): DATA must be a directory "
                          f"you may list and read.") from None

    documents, skipped_docs, stray, deeper = _walk(top, max_seconds, min_seconds)
    if limit_books is not None:
        for doc in documents[limit_books:]:
            # Not scored because the user asked for fewer books: accounted for, never a failure of
            # this run, even where a file of such a book would not have decoded.
            beyond = f"its book is beyond --limit-books {limit_books}"
            skipped_docs.append(SkippedDocument(doc.id, f"beyond --limit-books {limit_books}", [
                SkippedFile(s.path, f"{beyond} (and it would be skipped: {s.reason})", False) for s in doc.skipped] + [
                SkippedFile(str(p), beyond, False) for p in [f.path for f in doc.files] + doc.after_cut]))
    keep = documents[:limit_books] if limit_books is not None else documents
    if not keep:
        hint = (" Audio was found deeper: point DATA at the directory that holds the speaker folders."
                if deeper else "")
        if skipped_docs or stray:
            why = "; ".join([f"{s.id}: {s.reason}" for s in skipped_docs[:3]]
                            + [f"{s.path}: {s.reason}" for s in stray[:3]])
            raise ConfigError(f"no usable book in {root} ({why}).{hint}")
        raise ConfigError(f"no audio files found in {root}: expected <speaker>/<book>/<file>.flac (or "
                          f"{', '.join(AUDIO_EXTENSIONS)}).{hint}")
    return Dataset(root, keep, skipped_docs, stray)
