"""Reading audio at the boundary: any format sphn reads, resampled to 24 kHz mono, validated (SPEC §5.1, §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per Mimi frame (80 ms) = one LM step
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac")


@dataclass
class AudioInfo:
    """Facts about one input file, recorded in outputs."""

    path: str
    sample_rate: int   # of the file
    channels: int      # of the file
    channel: str       # "mix" or the index used
    seconds: float     # after resampling to 24 kHz
    samples: int       # at 24 kHz
    frames: int        # whole 80 ms frames

    def to_dict(self) -> dict:
        return asdict(self)


def load_audio(path: str | Path, channel: int | None = None) -> tuple[np.ndarray, AudioInfo]:
    """Decodes `path` to float32 mono at 24 kHz.

    Args:
        path: audio file (wav, flac, mp3, ogg, ...).
        channel: take this channel (0-based) instead of mixing all channels down.
    Returns:
        (samples [N] float32, AudioInfo).
    Raises:
        InputError: missing path, directory, undecodable/empty/truncated file, bad channel,
            non-finite samples, or shorter than one 80 ms frame.
    """
    import sphn

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file.")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an audio file.")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file (0 bytes).")
    try:
        reader = sphn.FileReader(str(p))
        sr, nch = int(reader.sample_rate), int(reader.channels)
        data, _ = sphn.read(str(p), sample_rate=SAMPLE_RATE)  # [C, N]
    except Exception as e:
        raise InputError(f"{p}: cannot decode as audio ({str(e).strip() or type(e).__name__}).") from None
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 1:
        data = data[None]
    if data.shape[-1] == 0:
        raise InputError(f"{p}: decoded to 0 samples (empty or truncated file).")
    if channel is not None:
        if not 0 <= channel < data.shape[0]:
            raise InputError(f"{p}: has {data.shape[0]} channel(s); --channel {channel} does not exist.")
        mono, used = data[channel], str(channel)
    else:
        mono, used = data.mean(axis=0), "mix"
    if not np.isfinite(mono).all():
        raise InputError(f"{p}: contains NaN or infinite samples.")
    if mono.shape[0] < FRAME_SIZE:
        raise InputError(f"{p}: {mono.shape[0] / SAMPLE_RATE * 1000:.0f} ms of audio is shorter than one "
                         f"80 ms frame.")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    info = AudioInfo(str(p), sr, nch, used, mono.shape[0] / SAMPLE_RATE, int(mono.shape[0]),
                     int(mono.shape[0] // FRAME_SIZE))
    return mono, info
