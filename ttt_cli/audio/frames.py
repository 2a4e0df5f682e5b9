"""An input as 80 ms frames for streaming: read whole as moshi.run_inference reads it, or in bounded pieces."""

from __future__ import annotations

import itertools
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import CHUNK_SECONDS, FRAME_SIZE, AudioInfo, iter_audio, load_audio

WHOLE_FILE_SECONDS = 600.0  # `ttt infer` reads files up to this long whole, as moshi.run_inference does


@dataclass
class FrameSource:
    """One file as consecutive 80 ms frames at 24 kHz, silence padding included (see `open_frames`)."""

    info: AudioInfo
    n_frames: int                  # whole frames of the padded signal (a partial last frame is dropped)
    whole: bool                    # read whole (moshi.run_inference's decoding) rather than in pieces
    frames: tp.Iterator[np.ndarray]  # [FRAME_SIZE] float32 each


def _framed(pieces: tp.Iterable[np.ndarray], before: int, after: int) -> tp.Iterator[np.ndarray]:
    """`before` zeros, the pieces, `after` zeros, cut into whole frames (the partial last one dropped)."""
    buf = np.zeros(before, np.float32)
    for piece in itertools.chain(pieces, [np.zeros(after, np.float32)]):
        buf = np.concatenate([buf, piece]) if buf.shape[0] else piece
        n = buf.shape[0] // FRAME_SIZE
        for i in range(n):
            yield buf[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]
        buf = buf[n * FRAME_SIZE:]


def open_frames(path: str | Path, channel: int | None = None, pads: tuple[int, int] = (0, 0),
                whole_file_seconds: float = WHOLE_FILE_SECONDS, chunk_seconds: float | None = None) -> FrameSource:
    """Opens `path` for streaming: frames of 1920 samples at 24 kHz, with `pads` samples of silence around it.

    A file up to `whole_file_seconds` long is decoded whole exactly as `moshi.run_inference` decodes
    it (`load_audio(..., moshi_compat=True)`), so `ttt infer` equals moshi's own run on it. A longer
    one is decoded in pieces of `chunk_seconds` (`iter_audio`: time-exact resampling), so memory
    stays flat in its length; for a 24 kHz file both give the same samples.

    Args:
        path: audio file.
        channel: take this channel instead of mixing down.
        pads: samples of silence (before, after) the file.
        whole_file_seconds: the longest file read whole (seconds at 24 kHz).
        chunk_seconds: native audio per piece when reading in pieces (None: `CHUNK_SECONDS`).
    Raises:
        InputError: as `iter_audio` (non-finite samples of a long file only when the frames reach them).
    """
    info, pieces = iter_audio(path, channel, chunk_seconds or CHUNK_SECONDS)
    whole = info.seconds <= whole_file_seconds
    if whole:
        wav, info = load_audio(path, channel, moshi_compat=True)
        pieces = iter([wav])
    n_frames = (pads[0] + info.samples + pads[1]) // FRAME_SIZE
    return FrameSource(info, n_frames, whole, _framed(pieces, pads[0], pads[1]))
