"""`ttt eval asr` inputs: audio files with same-stem .txt references, or a JSONL manifest, ttt's or NeMo's (SPEC §5.7)."""

from __future__ import annotations

import json
import math
import os
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_cli.audio import AUDIO_EXTENSIONS
from ttt_cli.errors import ConfigError

from ..inputs import SkippedFile, natural_key, probe_seconds
from .normalize import normalize_text

REFERENCE_SUFFIX = ".txt"
MANIFEST_SUFFIX = ".jsonl"
MANIFEST_SUFFIXES = (".jsonl", ".json")   # NeMo names its JSON-lines manifests `*.json`
# Manifest line forms: ttt's {"audio", "text"} and NeMo's {"audio_filepath", "text", "duration"}.
AUDIO_KEYS = {"audio": "audio-text", "audio_filepath": "nemo"}
# NeMo's `duration` is a hint: the audio is what is scored; a difference beyond this is reported (docs/asr.md).
DURATION_TOLERANCE_S = 0.1
DURATION_TOLERANCE_REL = 0.01
# A reference that is only this marker is left out of scoring, as kyutai's evaluation (after the
# open ASR leaderboard) does.
IGNORE_MARKER = "ignore time segment in scoring"


@dataclass
class AsrItem:
    """One recording to transcribe and score."""

    key: str                       # unique: audio path relative to DATA, or as written in the manifest
    audio: Path
    reference: str                 # as read (UTF-8), before normalisation
    reference_path: Path | None    # the .txt (directory form)
    line: int | None               # 1-based line of the manifest (manifest form)
    seconds: float | None          # from the audio header, when probed

    @property
    def id(self) -> str:
        """The key (what resume records name it by, as eval librilight's documents)."""
        return self.key


@dataclass
class AsrDataset:
    """What discovery found: the recordings to score, and every input left out with its reason."""

    source: Path                   # DATA: the directory or the manifest file
    kind: str                      # "directory" | "manifest"
    items: list[AsrItem]
    skipped: list[SkippedFile]
    manifest_format: str | None = None   # the lines' form: "audio-text", "nemo" or "mixed" (None: a directory)
    warnings: list[str] = field(default_factory=list)   # e.g. a NeMo duration the audio does not have

    @property
    def documents(self) -> list[AsrItem]:
        """The recordings, as `evals.resume` reads a dataset's documents."""
        return self.items

    @property
    def root(self) -> Path:
        """Where relative paths start: DATA itself, or the manifest's folder."""
        return self.source if self.kind == "directory" else self.source.parent


IGNORED = f"the reference is {IGNORE_MARKER!r} (left out of scoring)"


def _skipped(path: str, why: str) -> SkippedFile:
    """A left-out input; one left out on purpose (the ignore marker) is not a failure (no exit 1)."""
    return SkippedFile(path, why, failed=not why.endswith(IGNORED))


def check_reference(text: str) -> str | None:
    """Why a reference cannot be scored (None when it can): empty, or nothing left after normalisation.

    Args:
        text: the reference as read.
    """
    if not text.strip():
        return "empty reference"
    norm = normalize_text(text)
    if not norm:
        return f"the reference is empty after normalisation ({text.strip()[:60]!r})"
    if norm == IGNORE_MARKER:
        return IGNORED
    return None


def read_reference(path: Path) -> tuple[str | None, str | None]:
    """(text, None), or (None, reason) for an unreadable, non-UTF-8 or unusable reference file.

    Args:
        path: the reference `.txt`.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, f"cannot read the reference {path.name}: {e.strerror or e}"
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the transcript
    except UnicodeDecodeError as e:
        return None, f"the reference {path.name} is not UTF-8 (byte {e.start}); convert it to UTF-8"
    why = check_reference(text)
    return (None, f"{path.name}: {why}") if why else (text, None)


def _probe(item: AsrItem, probe: bool) -> str | None:
    if not probe:
        return None
    try:
        item.seconds = probe_seconds(item.audio)
    except (ValueError, OSError) as e:
        return str(e)
    return None


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def _unlistable(root: Path) -> list[SkippedFile]:
    """Directories below `root` that cannot be listed (`rglob` passes over them in silence: their recordings
    would vanish from the accounting); hidden ones are not inputs."""
    out: list[SkippedFile] = []

    def report(e: OSError) -> None:
        out.append(SkippedFile(str(e.filename), f"a directory that cannot be listed ({e.strerror or e}): its "
                                                f"recordings cannot be read"))
    for _, dirnames, _ in os.walk(root, onerror=report):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
    return out


def discover_directory(root: Path, probe: bool = True) -> AsrDataset:
    """Audio files (any depth, natural order of their paths) paired with `<same stem>.txt` beside them.

    Args:
        root: the directory.
        probe: read each audio header (duration); an unreadable audio file is skipped with the reason;
            a subdirectory that cannot be listed is reported as skipped too.
    Raises:
        ConfigError: `root` itself cannot be listed.
    """
    try:
        os.listdir(root)
    except OSError as e:
        raise ConfigError(f"cannot read DATA {root} ({e.strerror or e}): it must be a directory you may list and "
                          f"read.") from None
    groups: dict[tuple[Path, str], dict] = {}
    for p in root.rglob("*"):
        if not p.is_file() or not _visible(p.relative_to(root)):
            continue
        suffix = p.suffix.lower()
        if suffix in AUDIO_EXTENSIONS:
            groups.setdefault((p.parent, p.stem), {"audio": [], "txt": None})["audio"].append(p)
        elif suffix == REFERENCE_SUFFIX:
            groups.setdefault((p.parent, p.stem), {"audio": [], "txt": None})["txt"] = p
    items: list[AsrItem] = []
    skipped: list[SkippedFile] = _unlistable(root)
    for g in groups.values():
        audio, txt = sorted(g["audio"], key=lambda p: natural_key(p.name)), g["txt"]
        if not audio:
            skipped.append(SkippedFile(str(txt), "reference without audio: no audio file with this stem beside it"))
            continue
        if txt is None:
            skipped += [SkippedFile(str(a), f"no reference transcript: expected {a.stem}{REFERENCE_SUFFIX} "
                                            f"beside it") for a in audio]
            continue
        if len(audio) > 1:
            names = ", ".join(a.name for a in audio)
            skipped += [SkippedFile(str(a), f"{len(audio)} audio files ({names}) share the reference "
                                            f"{txt.name}; keep one") for a in audio]
            continue
        text, why = read_reference(txt)
        if why is None:
            item = AsrItem(audio[0].relative_to(root).as_posix(), audio[0], text, txt, None, None)
            why = _probe(item, probe)
            if why is None:
                items.append(item)
                continue
        skipped.append(_skipped(str(audio[0]), why))
    items.sort(key=lambda it: natural_key(it.key))
    skipped.sort(key=lambda s: natural_key(s.path))
    return AsrDataset(root, "directory", items, skipped)


def _manifest_entry(raw: bytes, n: int, manifest: Path) -> tuple[str, Path, str, str, tp.Any] | SkippedFile:
    """(key, audio path, text, line form, NeMo `duration` or None) of one manifest line, or why it cannot be used."""
    where, base = f"{manifest}:{n}", manifest.parent
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return SkippedFile(where, f"line {n}: not UTF-8")
    except json.JSONDecodeError as e:
        return SkippedFile(where, f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return SkippedFile(where, f"line {n}: not a JSON object with \"audio\" and \"text\"")
    keys = [k for k in AUDIO_KEYS if k in obj]
    if len(keys) > 1:
        return SkippedFile(where, f"line {n}: both \"audio\" and NeMo's \"audio_filepath\"; give one")
    key = keys[0] if keys else "audio"
    audio, text = obj.get(key), obj.get("text")
    if not isinstance(audio, str) or not audio.strip():
        return SkippedFile(where, f"line {n}: no \"audio\" path (or NeMo's \"audio_filepath\"; a non-empty string)")
    path = Path(audio).expanduser()
    path = path if path.is_absolute() else base / path
    if not isinstance(text, str):
        return SkippedFile(str(path), f"line {n}: no \"text\" transcript (a string)")
    if obj.get("offset") not in (None, 0, 0.0):
        return SkippedFile(str(path), f"line {n}: a NeMo segment (\"offset\": {obj['offset']!r}); ttt eval asr scores "
                                      f"whole recordings: cut the segment into a file of its own")
    if path.suffix.lower() not in AUDIO_EXTENSIONS:
        return SkippedFile(str(path), f"line {n}: not an audio file ({', '.join(AUDIO_EXTENSIONS)})")
    if not path.is_file():
        return SkippedFile(str(path), f"line {n}: audio file not found")
    why = check_reference(text)
    if why:
        return _skipped(str(path), f"line {n}: {why}")
    return audio, path, text, AUDIO_KEYS[key], obj.get("duration")


def duration_warning(item: AsrItem, duration: tp.Any) -> str | None:
    """What is wrong with a manifest line's `duration` hint (None: nothing, or no audio length to compare).

    The audio decides: `duration` is never used, only compared with the probed length, so that a
    manifest line pointing at the wrong file or at a cut-down copy is noticed.

    Args:
        item: the recording (its `seconds` probed, or None).
        duration: the line's `duration` value as read (None: none given).
    """
    if duration is None:
        return None
    where = f"{item.audio} (manifest line {item.line})"
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
            or duration < 0:
        return f"{where}: \"duration\" {duration!r} is not a number of seconds; ignored (the audio is used)"
    if item.seconds is None:
        return None
    if abs(duration - item.seconds) > max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_REL * item.seconds):
        return (f"{where}: the manifest says {duration:g} s, the audio holds {item.seconds:.3f} s; the whole audio "
                f"is scored (\"duration\" is only a hint): check that the line names the right file")
    return None


def _manifest_format(forms: set[str]) -> str | None:
    return None if not forms else forms.pop() if len(forms) == 1 else "mixed"


def discover_manifest(manifest: Path, probe: bool = True) -> AsrDataset:
    """One JSON object per line: `{"audio": PATH, "text": REFERENCE}` or NeMo's `{"audio_filepath": PATH,
    "text": REFERENCE, "duration": SECONDS}`; relative paths are relative to the manifest's directory;
    blank lines are ignored; a bad line is skipped with its line number. NeMo's `duration` is only
    compared with the audio (a warning when they differ, `duration_warning`); a line with a non-zero
    NeMo `offset` (a segment of a longer file) is skipped with the reason.

    Args:
        manifest: the .jsonl (or NeMo .json) file.
        probe: read each audio header (duration); an unreadable audio file is skipped with the reason.
    Raises:
        ConfigError: the manifest cannot be read, or it is one JSON document rather than one object a line.
    """
    try:
        data = manifest.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the manifest {manifest}: {e.strerror or e}.") from None
    lines = data.split(b"\n")
    items: list[AsrItem] = []
    skipped: list[SkippedFile] = []
    warnings: list[str] = []
    forms: set[str] = set()
    seen: dict[Path, int] = {}
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        entry = _manifest_entry(raw, n, manifest)
        if isinstance(entry, SkippedFile):
            skipped.append(entry)
            continue
        key, path, text, form, duration = entry
        first = seen.setdefault(path.resolve(), n)
        if first != n:
            skipped.append(SkippedFile(str(path), f"line {n}: the same audio file as line {first}"))
            continue
        item = AsrItem(key, path, text, None, n, None)
        why = _probe(item, probe)
        if why is None:
            items.append(item)
            forms.add(form)
            w = duration_warning(item, duration)
            warnings += [w] if w else []
        else:
            skipped.append(SkippedFile(str(path), f"line {n}: {why}"))
    if not items and skipped and _one_document(data):
        raise ConfigError(f"{manifest} is one JSON document, not a manifest: a manifest holds one JSON object per "
                          f"line (JSON lines), e.g. {{\"audio_filepath\": \"a.wav\", \"text\": \"...\", "
                          f"\"duration\": 12.3}}.")
    return AsrDataset(manifest, "manifest", items, skipped, _manifest_format(forms), warnings)


def _one_document(data: bytes) -> bool:
    """The whole file is one JSON value spread over several lines (a pretty-printed list or object)."""
    try:
        json.loads(data.decode("utf-8"))
    except ValueError:
        return False
    return len(data.strip().splitlines()) > 1


def discover_asr(data: Path | str, probe: bool = True) -> AsrDataset:
    """Finds the recordings of DATA and their references (SPEC §5.7; docs/asr.md).

    Args:
        data: a directory (audio files with a same-stem .txt reference beside each, searched at
            any depth) or a .jsonl manifest (`audio`, `text` per line; or NeMo's `audio_filepath`, `text`,
            `duration`, also as `.json`).
        probe: read each audio header for its duration (unreadable audio is skipped up front).
    Raises:
        ConfigError: DATA is missing or of another kind, or holds no usable recording (the message
            gives the first reasons).
    """
    src = Path(data).expanduser()
    if not src.exists():
        raise ConfigError(f"DATA {src} does not exist.")
    if src.is_dir():
        ds = discover_directory(src, probe)
    elif src.suffix.lower() in MANIFEST_SUFFIXES:
        ds = discover_manifest(src, probe)
    else:
        raise ConfigError(f"{src} is neither a directory nor a {MANIFEST_SUFFIX} manifest: DATA is a "
                          f"directory of audio files each with a same-stem {REFERENCE_SUFFIX} reference, or "
                          f"a JSONL file (.jsonl, or NeMo's .json) with one {{\"audio\": PATH, \"text\": "
                          f"REFERENCE}} or {{\"audio_filepath\": PATH, \"text\": REFERENCE, \"duration\": "
                          f"SECONDS}} per line.")
    if not ds.items:
        if not ds.skipped:
            what = ("no audio file with a .txt reference" if ds.kind == "directory" else "no entry")
            raise ConfigError(f"{what} found in {src}: expected audio files ({', '.join(AUDIO_EXTENSIONS)}) "
                              f"each with a same-stem {REFERENCE_SUFFIX} reference, or a manifest line "
                              f"{{\"audio\": PATH, \"text\": REFERENCE}}.")
        more = f" (and {len(ds.skipped) - 3} more)" if len(ds.skipped) > 3 else ""
        why = "; ".join(f"{s.path}: {s.reason}" for s in ds.skipped[:3])
        raise ConfigError(f"no usable recording in {src}: {why}{more}.")
    return ds
