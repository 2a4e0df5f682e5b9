"""A document's Mimi codes: streamed encoding of its concatenated files, cached on disk (SPEC §6)."""

from __future__ import annotations

import hashlib
import json
import time
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ttt_cli.audio import FRAME_SIZE, SAMPLE_RATE
from ttt_cli.codes import ENCODE_BLOCK_FRAMES
from ttt_cli.errors import InputError

from .librilight import Document, SkippedFile

CACHE_VERSION = 2  # 2: audio read without sphn's resampler delay, at its exact length
HASH_BLOCK = 1 << 20  # bytes read at a time when hashing audio files


@dataclass
class FileSpan:
    """Where one file sits in the document's 24 kHz concatenation."""

    path: str
    start_s: float
    end_s: float
    start_step: int   # start sample // 1920
    end_step: int     # end sample // 1920
    samples: int
    truncated: bool = False  # cut by --max-seconds

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

    @property
    def steps(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(HASH_BLOCK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def mimi_fingerprint(mimi) -> str:
    """sha256 over Mimi's weights (names, shapes, dtypes, bytes) and codebook count: the cache's model key."""
    import torch

    h = hashlib.sha256()
    h.update(f"n_q={mimi.num_codebooks}".encode())
    for name, t in sorted(mimi.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_key(file_digests: list[str], max_samples: int | None, mimi_fp: str, block_frames: int) -> str:
    """Key of a document's codes: its files' contents in order, the cut, Mimi's weights, the block size."""
    blob = json.dumps({"v": CACHE_VERSION, "files": file_digests, "max_samples": max_samples, "mimi": mimi_fp,
                       "block_frames": block_frames, "frame": FRAME_SIZE, "sr": SAMPLE_RATE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    from ttt_cli.models.presets import cache_root
    return cache_root() / "codes"


def _cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def _spans_from_meta(doc: Document, meta: dict) -> tuple[list[FileSpan], list[SkippedFile]]:
    # Paths come from the current dataset (same content, possibly moved), indices from the cache.
    files = [FileSpan(str(doc.files[s["index"]].path), s["start_s"], s["end_s"], s["start_step"], s["end_step"],
                      s["samples"], s["truncated"]) for s in meta["files"]]
    skipped = [SkippedFile(str(doc.files[s["index"]].path), s["reason"]) for s in meta["skipped"]]
    return files, skipped


def _load_cached(path: Path, doc: Document) -> DocumentCodes | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["ttt_codes"])
            codes = f.get_tensor("codes").long()
        files, skipped = _spans_from_meta(doc, meta)
        if meta.get("version") != CACHE_VERSION or codes.dim() != 2 or codes.shape[-1] != meta["steps"]:
            return None
    except Exception:  # a damaged or foreign cache entry is re-encoded, never trusted
        return None
    return DocumentCodes(codes, files, skipped, int(meta["samples"]), cache_hit=True, cache_path=str(path))


def _store(path: Path, dc: DocumentCodes, index_of: dict[str, int]) -> None:
    import torch
    from safetensors.torch import save_file
    from ttt_cli.io import atomic_write

    meta = {"version": CACHE_VERSION, "steps": dc.steps, "samples": dc.samples,
            "files": [{**f.to_dict(), "index": index_of[f.path]} for f in dc.files],
            "skipped": [{"index": index_of[s.path], "reason": s.reason} for s in dc.skipped]}
    for f in meta["files"]:
        f.pop("path")
    top = int(dc.codes.max()) if dc.codes.numel() else 0
    codes = dc.codes.to(torch.int16 if top < 2**15 else torch.int32).contiguous()  # Mimi codes < 2048
    atomic_write(path, lambda p: save_file({"codes": codes}, str(p), metadata={"ttt_codes": json.dumps(meta)}))


def encode_document(mimi, doc: Document, max_seconds: float | None = None, device: str = "cpu",
                    block_frames: int = ENCODE_BLOCK_FRAMES,
                    on_progress: tp.Callable[[float], None] | None = None) -> DocumentCodes:
    """Decodes the document's files one at a time and encodes their concatenation as one stream.

    Memory stays flat in the document's and its files' lengths: one chunk of one file's waveform
    (`ttt_cli.audio.iter_audio`) and one block of frames (`ttt_cli.codes.encode_stream`) at a
    time. Files that fail to open are skipped and recorded; a file found bad part-way (non-finite
    samples) keeps what was already encoded, is marked truncated and warned about. The
    boundaries are those of the concatenation actually encoded, in exact 24 kHz samples.

    Args:
        mimi: moshi MimiModel.
        doc: the document (files in order).
        max_seconds: cut the concatenation there (None: no cut).
        device: Mimi's device.
        block_frames: frames per Mimi call.
        on_progress: called with the seconds of audio encoded so far.
    """
    import torch
    from ttt_cli.audio import iter_audio
    from ttt_cli.codes import encode_stream

    max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    spans: list[FileSpan] = []
    skipped: list[SkippedFile] = []
    warnings: list[str] = []
    total = 0

    def pieces() -> tp.Iterator:
        nonlocal total
        for f in doc.files:
            if max_samples is not None and total >= max_samples:
                break
            try:
                info, stream = iter_audio(f.path)
            except InputError as e:
                skipped.append(SkippedFile(str(f.path), str(e).removeprefix(f"{f.path}: ")))
                continue
            take = info.samples if max_samples is None else min(info.samples, max_samples - total)
            start, fed = total, 0
            try:
                for piece in stream:
                    piece = piece[:take - fed]
                    fed += piece.shape[0]
                    total += piece.shape[0]
                    yield piece
                    if fed >= take:
                        break
            except InputError as e:
                # Found part-way: the pieces already encoded cannot be taken back, so the file ends there.
                if not fed:
                    skipped.append(SkippedFile(str(f.path), str(e).removeprefix(f"{f.path}: ")))
                    continue
                warnings.append(f"{e} Kept its first {fed / SAMPLE_RATE:.2f} s.")
            finally:
                stream.close()
            spans.append(FileSpan(str(f.path), start / SAMPLE_RATE, total / SAMPLE_RATE, start // FRAME_SIZE,
                                  total // FRAME_SIZE, fed, fed < info.samples))

    t0 = time.perf_counter()
    parts = []
    done = 0
    for c in encode_stream(mimi, pieces(), block_frames, device):
        parts.append(c.to("cpu", torch.long))  # [n_q, F]
        done += c.shape[-1]
        if on_progress is not None:
            on_progress(done * FRAME_SIZE / SAMPLE_RATE)
    codes = torch.cat(parts, -1) if parts else torch.zeros(mimi.num_codebooks, 0, dtype=torch.long)
    return DocumentCodes(codes, spans, skipped, total, encode_seconds=time.perf_counter() - t0, warnings=warnings)


def document_codes(mimi, doc: Document, max_seconds: float | None = None, cache_dir: Path | str | None = None,
                   device: str = "cpu", block_frames: int = ENCODE_BLOCK_FRAMES, mimi_fp: str | None = None,
                   on_progress: tp.Callable[[float], None] | None = None) -> DocumentCodes:
    """The document's codes from the cache when present, else encoded (and stored when `cache_dir` is set).

    Args:
        mimi: moshi MimiModel.
        doc: the document.
        max_seconds: the --max-seconds cut.
        cache_dir: codes cache directory (None: no cache).
        device: Mimi's device.
        block_frames: frames per Mimi call (part of the key).
        mimi_fp: `mimi_fingerprint(mimi)`, computed once per run by the caller.
        on_progress: called with the seconds encoded so far (cache misses only).
    """
    t0 = time.perf_counter()
    if cache_dir is None:
        return encode_document(mimi, doc, max_seconds, device, block_frames, on_progress)
    max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    key = cache_key([file_digest(f.path) for f in doc.files], max_samples, mimi_fp or mimi_fingerprint(mimi),
                    block_frames)
    path = _cache_path(Path(cache_dir), key)
    if path.is_file():
        hit = _load_cached(path, doc)
        if hit is not None:
            hit.key, hit.encode_seconds = key, time.perf_counter() - t0
            return hit
    dc = encode_document(mimi, doc, max_seconds, device, block_frames, on_progress)
    dc.key = key
    if dc.steps:
        index_of = {str(f.path): i for i, f in enumerate(doc.files)}
        try:
            _store(path, dc, index_of)
            back = _load_cached(path, doc)  # load it back: a cache entry that does not read is useless
            if back is None or not bool((back.codes == dc.codes).all()):
                raise OSError("the written entry does not read back")
            dc.cache_path = str(path)
        except OSError as e:
            dc.warnings.append(f"could not write the codes cache entry {path}: {e}; encoding will repeat next run.")
    dc.encode_seconds = time.perf_counter() - t0
    return dc
