"""Reading audio at the boundary: any format sphn reads as 24 kHz mono, validated, streamed (SPEC §5.1, §6, §7)."""

from __future__ import annotations

import math
import typing as tp
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sphn

from ..errors import InputError
from ..outputs import input_problem
from .resample import SAMPLE_RATE, Resampler, resampled, round_up

FRAME_SIZE = 1920  # samples per Mimi frame (80 ms) = one LM step
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")
CHUNK_SECONDS = 30.0   # native audio decoded and resampled at a time by `iter_audio`

_SEEK_CHECK = 64  # native samples decoded twice at each chunk start, to verify that seeking is exact
# A file that decodes to less than its header declares by more than this (seconds, or share of the
# declared length) is reported as truncated: its decodable part is used, with a recorded warning.
_SHORT_SECONDS = 0.08
_SHORT_SHARE = 0.01


@dataclass
class AudioInfo:
    """Facts about one input file, recorded in outputs."""

    path: str
    sample_rate: int   # of the file
    channels: int      # of the file
    channel: str       # "mix" or the index used
    seconds: float     # after resampling to 24 kHz
    samples: int       # at 24 kHz: ceil(native samples · 24000 / sample_rate)
    frames: int        # whole 80 ms frames
    warnings: list[str] = field(default_factory=list)  # e.g. a header that promises more than the file holds

    def to_dict(self) -> dict:
        return asdict(self)


class _Native:
    """One file's native-rate samples (one channel or the mean of all) as consecutive blocks.

    Long files are read block by block with `FileReader.decode`, which seeks by time; each block
    also re-decodes the last `_SEEK_CHECK` samples of the one before it and must match them
    exactly. Formats whose seeking is not sample-exact (MP3, Ogg Vorbis: priming, packet
    granularity), files shorter than two blocks, and files whose header length disagrees with
    their data are decoded whole instead (memory then grows with that file, at its native rate).

    Args:
        path: the file.
        reader: its `sphn.FileReader`.
        channel: channel index, or None to mix all channels down.
        block: native samples per block.
    """

    def __init__(self, path: Path, reader, channel: int | None, block: int):
        self.path, self.reader, self.channel, self.block = path, reader, channel, block
        self.sr = int(reader.sample_rate)
        self.whole: np.ndarray | None = None  # [n] mono, when read in one go
        self.head: np.ndarray | None = None   # [C, block] first block, when read in blocks
        self.declared: int | None = None      # the header's sample count, when it gives one
        self.n = self._measure()

    def _mono(self, data: np.ndarray) -> np.ndarray:
        data = np.atleast_2d(np.asarray(data, dtype=np.float32))
        mono = data[self.channel] if self.channel is not None else data.mean(axis=0, dtype=np.float32)
        return np.ascontiguousarray(mono, dtype=np.float32)

    def _read(self, start: int, count: int) -> np.ndarray:
        """Samples [C, <= count] from native sample `start` (fewer at the end of the file)."""
        try:
            # sphn floors start·sr and duration·sr: the half sample keeps float error off the boundary.
            data = self.reader.decode((start + 0.5) / self.sr, (count + 0.5) / self.sr)
        except Exception as e:
            raise InputError(f"{self.path}: cannot decode as audio ({str(e).strip() or type(e).__name__}).") from None
        return np.atleast_2d(np.asarray(data, dtype=np.float32))[:, :count]

    def _read_whole(self) -> np.ndarray:
        try:
            data = self.reader.decode_all()
        except Exception as e:
            raise InputError(f"{self.path}: cannot decode as audio ({str(e).strip() or type(e).__name__}).") from None
        return self._mono(data)

    def _measure(self) -> int:
        """The exact native sample count; picks block-wise or whole reading."""
        try:
            declared = float(self.reader.duration_sec) * self.sr
        except Exception:
            declared = math.nan
        if math.isfinite(declared) and declared > 0:
            self.declared = round(declared)
        if not math.isfinite(declared) or round(declared) <= 2 * self.block:
            self.whole = self._read_whole()
            return int(self.whole.shape[0])
        declared = round(declared)
        c, b = _SEEK_CHECK, self.block
        head = self._read(0, b)
        try:
            again = self._read(b - c, 2 * c)
            end = self._read(declared - c, 2 * c)  # the header's length, checked against the data
        except InputError:  # e.g. seeking past the data of a truncated file
            again = end = np.zeros((head.shape[0], 0), np.float32)
        if (head.shape[-1] < b or again.shape[-1] < c or not np.array_equal(again[:, :c], head[:, b - c:], equal_nan=True)
                or not 0 < end.shape[-1] <= c):
            self.whole = self._read_whole()
            return int(self.whole.shape[0])
        self.head = head
        return declared - c + int(end.shape[-1])

    def shortfall(self) -> str | None:
        """A warning when the file decodes to clearly less than its header declares (truncated or damaged)."""
        if self.declared is None or self.n >= self.declared:
            return None
        missing = self.declared - self.n
        if missing <= max(_SHORT_SECONDS * self.sr, _SHORT_SHARE * self.declared):
            return None
        return (f"{self.path}: its header declares {self.declared / self.sr:.2f} s but only {self.n / self.sr:.2f} s "
                f"decode (truncated or damaged file); the {self.n / self.sr:.2f} s that decode are used.")

    def _checked(self, mono: np.ndarray, start: int) -> np.ndarray:
        bad = np.flatnonzero(~np.isfinite(mono))
        if bad.size:
            raise InputError(f"{self.path}: contains NaN or infinite samples (the first at "
                             f"{(start + bad[0]) / self.sr:.2f} s).")
        return mono

    def check_whole(self) -> None:
        """Validates an in-memory file's samples up front (block-read files are checked block by block)."""
        if self.whole is not None:
            self._checked(self.whole, 0)

    def blocks(self) -> tp.Iterator[np.ndarray]:
        """Yields [<= block] float32 mono blocks covering exactly samples [0, n)."""
        c, b = _SEEK_CHECK, self.block
        start = 0
        prev = None  # [C, c] last samples of the previous block, as decoded
        while start < self.n and self.whole is None:
            k = min(b, self.n - start)
            if start == 0:
                data, self.head = self.head[:, :k], None
            else:
                data = self._read(start - c, c + k)
                if data.shape[-1] != c + k or not np.array_equal(data[:, :c], prev, equal_nan=True):
                    # Seeking went astray part-way: what was yielded is right, the rest comes from one decode.
                    whole = self._read_whole()
                    if whole.shape[0] != self.n:
                        raise InputError(f"{self.path}: decodes to {whole.shape[0]} samples in one pass but "
                                         f"{self.n} block by block; the file looks damaged.")
                    self.whole = whole
                    break
                data = data[:, c:]
            prev = data[:, -c:].copy()
            yield self._checked(self._mono(data), start)
            start += k
        while start < self.n:
            k = min(b, self.n - start)
            yield self._checked(self.whole[start:start + k], start)
            start += k


def _open(path: str | Path):
    p = Path(path)
    problem = input_problem(p)
    if problem is not None:
        raise InputError(f"{p}: {problem}.")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file (0 bytes).")
    try:
        reader = sphn.FileReader(str(p))
        sr, nch = int(reader.sample_rate), int(reader.channels)
    except Exception as e:
        raise InputError(f"{p}: cannot decode as audio ({str(e).strip() or type(e).__name__}).") from None
    if sr <= 0 or nch <= 0:
        raise InputError(f"{p}: cannot decode as audio (sample rate {sr}, {nch} channel(s)).")
    return p, reader, sr, nch


def iter_audio(path: str | Path, channel: int | None = None,
               chunk_seconds: float = CHUNK_SECONDS) -> tuple[AudioInfo, tp.Iterator[np.ndarray]]:
    """Opens `path` as float32 mono 24 kHz audio delivered in consecutive pieces.

    Everything but the samples' finiteness is validated before returning, and the info's
    length is exact: the pieces add up to `info.samples`. Memory stays bounded by a few chunks
    whatever the file's length (for files read block by block, see `_Native`). The pieces
    concatenate to resampling the whole file at once (to float rounding, ~1e-6).

    Args:
        path: audio file (wav, flac, mp3, ogg, ...).
        channel: take this channel (0-based) instead of mixing all channels down (mean).
        chunk_seconds: native audio per piece (rounded up to a whole resampling period).
    Returns:
        (AudioInfo, iterator of [n_i] float32 pieces at 24 kHz).
    Raises:
        InputError: missing path, directory, undecodable/empty/truncated file, bad channel, or
            shorter than one 80 ms frame; non-finite samples when found (up front for files up to
            two chunks long, else from the iterator when it reaches them).
    """
    if not chunk_seconds > 0:
        raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
    p, reader, sr, nch = _open(path)
    if channel is not None and not 0 <= channel < nch:
        raise InputError(f"{p}: has {nch} channel(s); --channel {channel} does not exist.")
    rs = Resampler(sr)
    step = round_up(max(int(chunk_seconds * sr), 2 * _SEEK_CHECK), rs.p)
    native = _Native(p, reader, channel, step)
    if native.n == 0:
        raise InputError(f"{p}: decoded to 0 samples (empty or truncated file).")
    samples = rs.out_len(native.n)
    if samples < FRAME_SIZE:
        raise InputError(f"{p}: {samples / SAMPLE_RATE * 1000:.1f} ms of audio ({samples} samples at 24 kHz) is "
                         f"shorter than one 80 ms frame ({FRAME_SIZE} samples).")
    native.check_whole()
    short = native.shortfall()
    info = AudioInfo(str(p), sr, nch, "mix" if channel is None else str(channel), samples / SAMPLE_RATE,
                     samples, samples // FRAME_SIZE, [short] if short else [])
    pieces = native.blocks() if rs.identity else resampled(native.blocks(), native.n, rs, step)
    return info, pieces


def load_audio(path: str | Path, channel: int | None = None,
               moshi_compat: bool = False) -> tuple[np.ndarray, AudioInfo]:
    """Decodes `path` to float32 mono at 24 kHz, whole (the concatenation of `iter_audio`'s pieces).

    Args:
        path: audio file (wav, flac, mp3, ogg, ...).
        channel: take this channel (0-based) instead of mixing all channels down.
        moshi_compat: decode exactly as `moshi.run_inference` does (`sphn.read(path,
            sample_rate=24000)`), keeping sphn's resampler delay (32 ms from 16 kHz) and end
            padding, so that `ttt infer` equals moshi's own run on any file. Same for 24 kHz files.
    Returns:
        (samples [N] float32, AudioInfo).
    Raises:
        InputError: missing path, directory, undecodable/empty/truncated file, bad channel,
            non-finite samples, or shorter than one 80 ms frame.
    """
    info, pieces = iter_audio(path, channel)
    if moshi_compat and info.sample_rate != SAMPLE_RATE:
        data, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)  # [C, N], validated above
        data = np.asarray(data, dtype=np.float32)
        out = np.ascontiguousarray(data.mean(axis=0) if channel is None else data[channel], dtype=np.float32)
        if not np.isfinite(out).all():
            raise InputError(f"{path}: contains NaN or infinite samples.")
        n = out.shape[0]
        return out, AudioInfo(info.path, info.sample_rate, info.channels, info.channel, n / SAMPLE_RATE, n,
                               n // FRAME_SIZE, info.warnings)
    out = np.empty(info.samples, np.float32)
    i = 0
    for piece in pieces:
        out[i:i + piece.shape[0]] = piece
        i += piece.shape[0]
    return out, info

