"""Writing Moshi's voice: a 24 kHz mono WAV written as samples come, byte for byte `sphn.write_wav`'s."""

from __future__ import annotations

import typing as tp
import wave
from pathlib import Path

import numpy as np

from ..io import PendingFile
from .resample import SAMPLE_RATE


class WavStream:
    """A 24 kHz mono 16-bit WAV written as samples come (memory flat in its length), atomically.

    The format and the float -> int16 conversion are `sphn.write_wav`'s (clip to [-1, 1], times 32767,
    truncated), so a file written piece by piece is byte for byte the file `sphn.write_wav` writes
    from the concatenated samples. Samples go to a temporary name (`ttt_cli.io.PendingFile`);
    `finish()` completes the header, `commit()` renames onto `path`, `discard()` removes it.

    Args:
        path: the destination .wav.
    """

    def __init__(self, path: Path | str):
        self.file = PendingFile(path)
        self.samples = 0
        self._w: tp.Any = None
        try:
            self._w = wave.open(str(self.file.tmp), "wb")
            self._w.setnchannels(1)
            self._w.setsampwidth(2)
            self._w.setframerate(SAMPLE_RATE)
        except BaseException:
            self.discard()
            raise

    @property
    def path(self) -> Path:
        return self.file.path

    def write(self, pcm: np.ndarray) -> None:
        """Appends float32 samples [n] in [-1, 1]."""
        x = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * np.float32(32767)
        self._w.writeframesraw(x.astype("<i2").tobytes())
        self.samples += int(x.shape[0])

    def finish(self) -> None:
        """Completes the header (the file stays under its temporary name until `commit`)."""
        if self._w is not None:
            w, self._w = self._w, None
            w.close()

    def commit(self) -> Path:
        """Finishes the file and renames it onto `path`."""
        self.finish()
        return self.file.commit()

    def discard(self) -> None:
        """Removes the temporary file (never raises)."""
        if self._w is not None:
            w, self._w = self._w, None
            try:
                w.close()
            except Exception:
                pass
        self.file.discard()
