"""A document's Mimi codes: streamed encoding of its concatenated files, cached on disk (SPEC §6)."""

from __future__ import annotations

import hashlib
import json
import time
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ttt_cli.codes  # encode_stream called through the module: a test stands in a fake encoder for it
from ttt_cli.audio import FRAME_SIZE, SAMPLE_RATE, iter_audio
from ttt_cli.codes import ENCODE_BLOCK_FRAMES
from ttt_cli.errors import InputError
from ttt_cli.io import atomic_write
from ttt_cli.models.presets import cache_root

from ..inputs import SkippedFile, file_digest, mimi_fingerprint
from .data import Document

# 2: audio read without sphn's resampler delay, at its exact length. 3: entries carry the content keys
# of their inputs and a checksum of their payload, verified on every read (SPEC §7.1).
CACHE_VERSION = 3


@dataclass
class FileSpan:
    """Where one file sits in the document's 24 kHz concatenation."""

    path: str
    start_s: float
    end_s: float
    start_step: int   # start sample // 1920
    end_step: int     # end sample // 1920
    samples: int
    truncated: bool = False  # cut by --max-seconds, or found bad part-way (see warnings)
    warnings: list[str] = field(default_factory=list)  # e.g. decodes shorter than its header says

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DocumentCodes:
    """Mimi codes of one document and the file boundaries they came from."""

    codes: tp.Any                     # [n_q, T] int64 torch tensor on CPU
    files: list[FileSpan]
    skipped: list[SkippedFile]
    samples: int
    cache_hit: bool = False
    encode_seconds: float = 0.0
    key: str = ""
    cache_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)  # {index, sha256} of every file opened (content keys)

    @property
    def steps(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def layout_of(mimi) -> dict:
    """What the codes' shape and range depend on besides the weights: codebooks, cardinality, frame.

    Args:
        mimi: moshi MimiModel.
    """
    return {"n_q": int(mimi.num_codebooks), "cardinality": int(mimi.cardinality), "frame": FRAME_SIZE,
            "sr": SAMPLE_RATE}


def cache_key(file_digests: list[str], max_samples: int | None, mimi_fp: str, block_frames: int,
              layout: dict | None = None) -> str:
    """Key of a document's codes: its files' contents in order, the cut, Mimi's weights and layout, the block size.

    Args:
        file_digests: `file_digest` of each file in order.
        max_samples: the --max-seconds cut in samples (None: none).
        mimi_fp: `mimi_fingerprint`.
        block_frames: frames per Mimi call.
        layout: `layout_of(mimi)`.
    """
    blob = json.dumps({"v": CACHE_VERSION, "files": file_digests, "max_samples": max_samples, "mimi": mimi_fp,
                       "block_frames": block_frames, "layout": layout, "frame": FRAME_SIZE, "sr": SAMPLE_RATE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    """`$TTT_CACHE/codes` (the user cache's codes folder)."""
    return cache_root() / "codes"


def _cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def payload_digest(codes) -> str:
    """sha256 over the stored codes: dtype, shape and bytes.

    Args:
        codes: [n_q, T] integer tensor on CPU.
    """
    t = codes.contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Bad(Exception):
    """A cache entry that may not be used; the message says why."""


def _verify(meta: tp.Any, codes, doc: Document, key: str, expect: dict, digest_of) -> None:
    """Checks a cache entry against what it must have been made from; raises _Bad naming the first problem."""
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise _Bad(f"written by another cache format ({meta.get('version') if isinstance(meta, dict) else '?'}, "
                   f"this ttt writes {CACHE_VERSION})")
    inputs = meta.get("inputs") or {}
    if meta.get("key") != key:
        raise _Bad("its key does not match its name")
    for k, what in (("mimi", "other Mimi weights"), ("layout", "another codebook layout"),
                    ("max_samples", "another --max-seconds cut"), ("block_frames", "another encoding block size")):
        if inputs.get(k) != expect[k]:
            raise _Bad(f"made with {what}")
    paths = doc.all_paths()
    for rec in inputs.get("files", []):
        i = rec["index"]
        if not (isinstance(i, int) and 0 <= i < len(paths)):
            raise _Bad(f"names input file #{i}, the book has {len(paths)}")
        if digest_of(i) != rec["sha256"]:
            raise _Bad(f"made from other audio: {paths[i]} changed since")
    if payload_digest(codes) != meta.get("payload_sha256"):
        raise _Bad("its codes do not match their checksum (altered or damaged)")
    if codes.dtype not in (torch.int16, torch.int32, torch.int64) or codes.dim() != 2 \
            or tuple(codes.shape) != (expect["layout"]["n_q"], meta["steps"]):
        raise _Bad(f"codes of shape {list(codes.shape)} and type {codes.dtype}, expected "
                   f"[{expect['layout']['n_q']}, {meta['steps']}] integers")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= expect["layout"]["cardinality"]):
        raise _Bad(f"codes out of range (min {int(codes.min())}, max {int(codes.max())}; Mimi's codebooks have "
                   f"{expect['layout']['cardinality']} entries)")
    end = 0
    for sp in meta["files"]:
        if not (0 <= sp["index"] < len(paths)) or sp["start_step"] < end or sp["end_step"] > meta["steps"] \
                or sp["end_step"] < sp["start_step"]:
            raise _Bad("its file boundaries are inconsistent")
        end = sp["start_step"]
    for sp in meta["skipped"]:
        if not 0 <= sp["index"] < len(paths):
            raise _Bad("its skipped files are inconsistent")


def _load_cached(path: Path, doc: Document, key: str, expect: dict,
                 digest_of: tp.Callable[[int], str]) -> tuple["DocumentCodes | None", str | None]:
    """A verified cache entry as DocumentCodes, or (None, why it cannot be used)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["ttt_codes"])
            codes = f.get_tensor("codes")
    except Exception as e:  # a damaged or foreign file is re-encoded, never trusted
        return None, f"unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    try:
        _verify(meta, codes, doc, key, expect, digest_of)
        paths = doc.all_paths()
        files = [FileSpan(str(paths[s["index"]]), s["start_s"], s["end_s"], s["start_step"], s["end_step"],
                          s["samples"], s["truncated"], list(s.get("warnings", []))) for s in meta["files"]]
        skipped = [SkippedFile(str(paths[s["index"]]), s["reason"], bool(s.get("failed", True)))
                   for s in meta["skipped"]]
        samples = int(meta["samples"])
    except _Bad as e:
        return None, str(e)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return None, f"malformed metadata ({type(e).__name__}: {e})"
    warnings = [w for sp in files for w in sp.warnings]
    return DocumentCodes(codes.long(), files, skipped, samples, cache_hit=True, cache_path=str(path),
                         warnings=warnings, inputs=list(meta["inputs"]["files"])), None


def _store(path: Path, dc: DocumentCodes, doc: Document, key: str, expect: dict) -> None:
    index_of = {str(p): i for i, p in enumerate(doc.all_paths())}
    top = int(dc.codes.max()) if dc.codes.numel() else 0
    codes = dc.codes.to(torch.int16 if top < 2**15 else torch.int32).contiguous()  # Mimi codes < 2048
    meta = {"version": CACHE_VERSION, "key": key, "steps": dc.steps, "samples": dc.samples,
            "inputs": {**expect, "files": dc.inputs}, "payload_sha256": payload_digest(codes),
            "files": [{**{k: v for k, v in f.to_dict().items() if k != "path"}, "index": index_of[f.path]}
                      for f in dc.files],
            "skipped": [{"index": index_of[s.path], "reason": s.reason, "failed": s.failed} for s in dc.skipped]}
    atomic_write(path, lambda p: save_file({"codes": codes}, str(p), metadata={"ttt_codes": json.dumps(meta)}))


class _Feed:
    """A document's files decoded one at a time and cut at `max_samples`: the pieces Mimi encodes, and where
    each file ended up (an encoded span, or skipped), with the warnings met."""

    def __init__(self, paths: list[Path], max_seconds: float | None):
        self.paths, self.max_seconds = paths, max_seconds
        self.max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
        self.spans: list[FileSpan] = []
        self.skipped: list[SkippedFile] = []
        self.warnings: list[str] = []
        self.total = 0  # samples fed so far

    def pieces(self) -> tp.Iterator:
        """Every file's waveform pieces in order, up to the cut; the files after it are listed as cut."""
        for n, path in enumerate(self.paths):
            if self.max_samples is not None and self.total >= self.max_samples:
                self.skipped.extend(SkippedFile(str(q), f"after the --max-seconds cut ({self.max_seconds:g} s)", False)
                                    for q in self.paths[n:])
                return
            yield from self._file(path)

    def _file(self, path: Path) -> tp.Iterator:
        try:
            info, stream = iter_audio(path)
        except InputError as e:
            self.skipped.append(SkippedFile(str(path), str(e).removeprefix(f"{path}: ")))
            return
        take = info.samples if self.max_samples is None else min(info.samples, self.max_samples - self.total)
        start, fed, notes = self.total, 0, list(info.warnings)
        try:
            for piece in stream:
                piece = piece[:take - fed]
                fed += piece.shape[0]
                self.total += piece.shape[0]
                yield piece
                if fed >= take:
                    break
        except InputError as e:
            # Found part-way: the pieces already encoded cannot be taken back, so the file ends there.
            if not fed:
                self.skipped.append(SkippedFile(str(path), str(e).removeprefix(f"{path}: ")))
                return
            notes.append(f"{e} Kept its first {fed / SAMPLE_RATE:.2f} s.")
        finally:
            stream.close()
        self.warnings.extend(notes)
        self.spans.append(FileSpan(str(path), start / SAMPLE_RATE, self.total / SAMPLE_RATE, start // FRAME_SIZE,
                                   self.total // FRAME_SIZE, fed, fed < info.samples, notes))


def encode_document(mimi, doc: Document, max_seconds: float | None = None, device: str = "cpu",
                    block_frames: int = ENCODE_BLOCK_FRAMES,
                    on_progress: tp.Callable[[float], None] | None = None) -> DocumentCodes:
    """Decodes the document's files one at a time and encodes their concatenation as one stream.

    Memory stays flat in the document's and its files' lengths: one chunk of one file's waveform
    (`ttt_cli.audio.iter_audio`) and one block of frames (`ttt_cli.codes.encode_stream`) at a
    time. Every file ends in exactly one place: `files` (encoded; `truncated` and a warning when it
    was cut or found bad part-way, a warning when it decodes shorter than its header says) or
    `skipped` (unreadable: `failed`; after the --max-seconds cut: not failed). The cut is made on
    decoded lengths, so a file whose header promises more than it holds never hides later files.
    The boundaries are those of the concatenation actually encoded, in exact 24 kHz samples.

    Args:
        mimi: moshi MimiModel.
        doc: the document (files in order, then those after the header-based cut).
        max_seconds: cut the concatenation there (None: no cut).
        device: Mimi's device.
        block_frames: frames per Mimi call.
        on_progress: called with the seconds of audio encoded so far.
    """
    feed = _Feed(doc.all_paths(), max_seconds)
    t0 = time.perf_counter()
    parts = []
    done = 0
    for c in ttt_cli.codes.encode_stream(mimi, feed.pieces(), block_frames, device):
        parts.append(c.to("cpu", torch.long))  # [n_q, F]
        done += c.shape[-1]
        if on_progress is not None:
            on_progress(done * FRAME_SIZE / SAMPLE_RATE)
    codes = torch.cat(parts, -1) if parts else torch.zeros(mimi.num_codebooks, 0, dtype=torch.long)  # [n_q, T]
    return DocumentCodes(codes, feed.spans, feed.skipped, feed.total, encode_seconds=time.perf_counter() - t0,
                         warnings=feed.warnings)


class _Entry:
    """A document's entry in the codes cache: its key (from its files' contents, hashed once each), its path,
    and what a stored entry must have been made from."""

    def __init__(self, cache_dir: Path, mimi, doc: Document, max_seconds: float | None, block_frames: int,
                 mimi_fp: str | None):
        self.doc, self.paths = doc, doc.all_paths()
        self.digests: dict[int, str | None] = {}
        max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
        self.expect = {"mimi": mimi_fp or mimi_fingerprint(mimi), "layout": layout_of(mimi),
                       "max_samples": max_samples, "block_frames": block_frames}
        self.key = cache_key([self.digest_of(i) for i in range(len(doc.files))], max_samples, self.expect["mimi"],
                             block_frames, self.expect["layout"])
        self.path = _cache_path(cache_dir, self.key)

    def digest_of(self, i: int) -> str | None:
        if i not in self.digests:
            try:
                self.digests[i] = file_digest(self.paths[i])
            except OSError:
                self.digests[i] = None  # gone or unreadable: never equal to a recorded digest
        return self.digests[i]

    def load(self) -> tuple[DocumentCodes | None, str | None]:
        return _load_cached(self.path, self.doc, self.key, self.expect, self.digest_of)

    def inputs_of(self, dc: DocumentCodes) -> list[dict]:
        """{index, sha256} of every file the encoding opened, in order (the entry's content keys)."""
        index_of = {str(p): i for i, p in enumerate(self.paths)}
        return [{"index": index_of[x], "sha256": self.digest_of(index_of[x])}
                for x in sorted({f.path for f in dc.files} | {s.path for s in dc.skipped if s.failed},
                                key=lambda x: index_of[x])]

    def store(self, dc: DocumentCodes) -> None:
        """Writes the entry and reads it back; a failure leaves no entry and a warning in `dc`."""
        try:
            _store(self.path, dc, self.doc, self.key, self.expect)
            # load it back: a cache entry that does not read is useless
            back, problem = self.load()
            if back is None or not bool((back.codes == dc.codes).all()):
                raise OSError(f"the written entry does not read back ({problem or 'codes differ'})")
            dc.cache_path = str(self.path)
        except OSError as e:
            try:
                self.path.unlink(missing_ok=True)  # an entry that does not read back must not be found next run
            except OSError:
                pass
            dc.warnings.append(f"could not write the codes cache entry {self.path}: {e.strerror or e}; encoding will "
                               f"repeat next run.")


def document_codes(mimi, doc: Document, max_seconds: float | None = None, cache_dir: Path | str | None = None,
                   device: str = "cpu", block_frames: int = ENCODE_BLOCK_FRAMES, mimi_fp: str | None = None,
                   on_progress: tp.Callable[[float], None] | None = None, store: bool = True) -> DocumentCodes:
    """The document's codes from the cache when a verified entry is there, else encoded (and stored).

    An entry is used only after checking it against what it was made from (the audio files'
    contents, Mimi's weights and layout, the cut, the block size) and its payload checksum, shape
    and code range; an entry that fails is reported in `warnings` and encoded again (SPEC §7.1).

    Args:
        mimi: moshi MimiModel.
        doc: the document.
        max_seconds: the --max-seconds cut.
        cache_dir: codes cache directory (None: no cache).
        device: Mimi's device.
        block_frames: frames per Mimi call (part of the key).
        mimi_fp: `mimi_fingerprint(mimi)`, computed once per run by the caller.
        on_progress: called with the seconds encoded so far (cache misses only).
        store: write new entries (False for a cache directory that cannot be written: read only).
    """
    t0 = time.perf_counter()
    if cache_dir is None:
        return encode_document(mimi, doc, max_seconds, device, block_frames, on_progress)
    entry = _Entry(Path(cache_dir), mimi, doc, max_seconds, block_frames, mimi_fp)
    notes = []
    if entry.path.exists():
        hit, problem = entry.load()
        if hit is not None:
            hit.key, hit.encode_seconds = entry.key, time.perf_counter() - t0
            return hit
        notes.append(f"codes cache entry {entry.path} for {doc.id} was not used: {problem}; encoded again.")
    dc = encode_document(mimi, doc, max_seconds, device, block_frames, on_progress)
    dc.key = entry.key
    dc.warnings = notes + dc.warnings
    dc.inputs = entry.inputs_of(dc)
    if dc.steps and store:
        entry.store(dc)
    dc.encode_seconds = time.perf_counter() - t0
    return dc
