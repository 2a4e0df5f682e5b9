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

# 2: audio read without sphn's resampler delay, at its exact length. 3: entries carry the content keys
# of their inputs and a checksum of their payload, verified on every read (SPEC §7.1).
CACHE_VERSION = 3
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


def digest_or_none(path: Path | str) -> str | None:
    """`file_digest`, or None for a file that cannot be read (gone, unreadable)."""
    try:
        return file_digest(path)
    except OSError:
        return None


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


def layout_of(mimi) -> dict:
    """What the codes' shape and range depend on besides the weights: codebooks, cardinality, frame."""
    return {"n_q": int(mimi.num_codebooks), "cardinality": int(mimi.cardinality), "frame": FRAME_SIZE,
            "sr": SAMPLE_RATE}


def cache_key(file_digests: list[str], max_samples: int | None, mimi_fp: str, block_frames: int,
              layout: dict | None = None) -> str:
    """Key of a document's codes: its files' contents in order, the cut, Mimi's weights and layout, the block size."""
    blob = json.dumps({"v": CACHE_VERSION, "files": file_digests, "max_samples": max_samples, "mimi": mimi_fp,
                       "block_frames": block_frames, "layout": layout, "frame": FRAME_SIZE, "sr": SAMPLE_RATE},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    from ttt_cli.models.presets import cache_root
    return cache_root() / "codes"


def _cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def payload_digest(codes) -> str:
    """sha256 over the stored codes: dtype, shape and bytes."""
    t = codes.contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Bad(Exception):
    """A cache entry that may not be used; the message says why."""


def _verify(meta: tp.Any, codes, doc: Document, key: str, expect: dict, digest_of) -> None:
    """Checks a cache entry against what it must have been made from; raises _Bad naming the first problem."""
    import torch

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
    from safetensors import safe_open

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
    import torch
    from safetensors.torch import save_file
    from ttt_cli.io import atomic_write

    index_of = {str(p): i for i, p in enumerate(doc.all_paths())}
    top = int(dc.codes.max()) if dc.codes.numel() else 0
    codes = dc.codes.to(torch.int16 if top < 2**15 else torch.int32).contiguous()  # Mimi codes < 2048
    meta = {"version": CACHE_VERSION, "key": key, "steps": dc.steps, "samples": dc.samples,
            "inputs": {**expect, "files": dc.inputs}, "payload_sha256": payload_digest(codes),
            "files": [{**{k: v for k, v in f.to_dict().items() if k != "path"}, "index": index_of[f.path]}
                      for f in dc.files],
            "skipped": [{"index": index_of[s.path], "reason": s.reason, "failed": s.failed} for s in dc.skipped]}
    atomic_write(path, lambda p: save_file({"codes": codes}, str(p), metadata={"ttt_codes": json.dumps(meta)}))


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
    import torch
    from ttt_cli.audio import iter_audio
    from ttt_cli.codes import encode_stream

    max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    spans: list[FileSpan] = []
    skipped: list[SkippedFile] = []
    warnings: list[str] = []
    total = 0
    paths = doc.all_paths()

    def pieces() -> tp.Iterator:
        nonlocal total
        for n, path in enumerate(paths):
            if max_samples is not None and total >= max_samples:
                skipped.extend(SkippedFile(str(q), f"after the --max-seconds cut ({max_seconds:g} s)", False)
                               for q in paths[n:])
                return
            try:
                info, stream = iter_audio(path)
            except InputError as e:
                skipped.append(SkippedFile(str(path), str(e).removeprefix(f"{path}: ")))
                continue
            take = info.samples if max_samples is None else min(info.samples, max_samples - total)
            start, fed, notes = total, 0, list(info.warnings)
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
                    skipped.append(SkippedFile(str(path), str(e).removeprefix(f"{path}: ")))
                    continue
                notes.append(f"{e} Kept its first {fed / SAMPLE_RATE:.2f} s.")
            finally:
                stream.close()
            warnings.extend(notes)
            spans.append(FileSpan(str(path), start / SAMPLE_RATE, total / SAMPLE_RATE, start // FRAME_SIZE,
                                  total // FRAME_SIZE, fed, fed < info.samples, notes))

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
    max_samples = None if max_seconds is None else int(round(max_seconds * SAMPLE_RATE))
    paths = doc.all_paths()
    digests: dict[int, str | None] = {}

    def digest_of(i: int) -> str | None:
        if i not in digests:
            try:
                digests[i] = file_digest(paths[i])
            except OSError:
                digests[i] = None  # gone or unreadable: never equal to a recorded digest
        return digests[i]

    expect = {"mimi": mimi_fp or mimi_fingerprint(mimi), "layout": layout_of(mimi), "max_samples": max_samples,
              "block_frames": block_frames}
    key = cache_key([digest_of(i) for i in range(len(doc.files))], max_samples, expect["mimi"], block_frames,
                    expect["layout"])
    path = _cache_path(Path(cache_dir), key)
    notes = []
    if path.exists():
        hit, problem = _load_cached(path, doc, key, expect, digest_of)
        if hit is not None:
            hit.key, hit.encode_seconds = key, time.perf_counter() - t0
            return hit
        notes.append(f"codes cache entry {path} for {doc.id} was not used: {problem}; encoded again.")
    dc = encode_document(mimi, doc, max_seconds, device, block_frames, on_progress)
    dc.key = key
    dc.warnings = notes + dc.warnings
    index_of = {str(p): i for i, p in enumerate(paths)}
    dc.inputs = [{"index": index_of[x], "sha256": digest_of(index_of[x])}
                 for x in sorted({f.path for f in dc.files} | {s.path for s in dc.skipped if s.failed},
                                 key=lambda x: index_of[x])]
    if dc.steps and store:
        try:
            _store(path, dc, doc, key, expect)
            # load it back: a cache entry that does not read is useless
            back, problem = _load_cached(path, doc, key, expect, digest_of)
            if back is None or not bool((back.codes == dc.codes).all()):
                raise OSError(f"the written entry does not read back ({problem or 'codes differ'})")
            dc.cache_path = str(path)
        except OSError as e:
            try:
                path.unlink(missing_ok=True)  # an entry that does not read back must not be found next run
            except OSError:
                pass
            dc.warnings.append(f"could not write the codes cache entry {path}: {e.strerror or e}; encoding will "
                               f"repeat next run.")
    dc.encode_seconds = time.perf_counter() - t0
    return dc
