"""Resampling to Mimi's 24 kHz with sphn's delay undone, whole or in pieces that concatenate exactly."""

from __future__ import annotations

import math
import typing as tp

import numpy as np
import sphn

SAMPLE_RATE = 24000  # Mimi's rate: every input is resampled to it
MARGIN_SECONDS = 0.25  # native context resampled on each side of a chunk, then cut off

# sphn.resample is an FFT resampler over blocks of this many input samples (rounded up to a whole
# number of rate periods); the block length is its filter length, which sets its delay.
_SPHN_RESAMPLE_BLOCK = 1024


def round_up(n: int, m: int) -> int:
    """`n` rounded up to a multiple of `m`."""
    return -(-n // m) * m


class Resampler:
    """`sphn.resample` to 24 kHz with its delay undone: output sample k is the input at time k / 24000.

    sphn's FFT resampler delays its output by half its filter (fft_in // 2 input samples; 32 ms
    from 16 kHz) and stops at the end of its last input block, so plain `sphn.read(...,
    sample_rate=24000)` starts with that much silence, loses as much real audio at the end, and
    pads the length to a whole block. Leading zeros make the delay a whole number of output
    samples (so it can be cut exactly), trailing zeros flush the end out.

    Args:
        sample_rate: the input's rate.
    """

    def __init__(self, sample_rate: int):
        g = math.gcd(sample_rate, SAMPLE_RATE)
        self.sample_rate, self.p, self.q = sample_rate, sample_rate // g, SAMPLE_RATE // g
        fft_in = round_up(_SPHN_RESAMPLE_BLOCK, self.p)
        half = fft_in // 2
        self.lead = (-half) % self.p
        self.delay = (half + self.lead) // self.p * self.q
        self.tail = half + fft_in
        # A chunk's output depends on its input within half a filter; the margin covers that with room.
        self.margin = round_up(max(int(MARGIN_SECONDS * sample_rate), fft_in), self.p)

    @property
    def identity(self) -> bool:
        return self.p == self.q

    def out_len(self, n: int) -> int:
        """24 kHz samples of `n` input samples: those whose time falls before the input's end."""
        return -(-n * self.q // self.p)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """[L] float32 at the input rate -> [out_len(L)] float32 at 24 kHz."""
        if self.identity:
            return x
        z = np.zeros(self.lead + x.shape[0] + self.tail, np.float32)
        z[self.lead:self.lead + x.shape[0]] = x
        y = sphn.resample(z[None], src_sample_rate=self.sample_rate, dst_sample_rate=SAMPLE_RATE)[0]
        m = self.out_len(x.shape[0])
        if y.shape[0] < self.delay + m:  # a sphn whose resampler no longer works as assumed above
            raise RuntimeError(f"sphn.resample returned {y.shape[0]} samples for {z.shape[0]}, "
                               f"expected at least {self.delay + m}.")
        return np.asarray(y[self.delay:self.delay + m], dtype=np.float32)


def resampled(blocks: tp.Iterable[np.ndarray], n: int, rs: Resampler, step: int) -> tp.Iterator[np.ndarray]:
    """24 kHz pieces of a native waveform given as blocks covering [0, n), `step` native samples each.

    Each piece is resampled with `rs.margin` native samples of context on either side (zeros
    beyond the ends, as for the whole file) and the margins' output cut off, so the pieces
    concatenate to resampling the whole waveform at once. `step` and the margin are whole rate
    periods, so every piece starts on an exact 24 kHz sample.
    """
    m = rs.margin
    buf, buf0 = np.zeros(0, np.float32), 0  # native samples [buf0, buf0 + len(buf))
    a = 0
    for blk in blocks:
        buf = np.concatenate([buf, blk])
        while a < n and buf0 + buf.shape[0] >= min(a + step + m, n):
            b = min(a + step, n)
            s, e = max(a - m, 0), min(b + m, n)
            y = rs(buf[s - buf0:e - buf0])
            off = s // rs.p * rs.q
            yield y[rs.out_len(a) - off:rs.out_len(b) - off]
            a = b
            drop = max(a - m, 0) - buf0
            buf, buf0 = buf[drop:], buf0 + drop
    if a != n:
        raise RuntimeError(f"audio blocks covered {buf0 + buf.shape[0]} of {n} samples")
