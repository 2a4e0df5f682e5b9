"""Audio reading against the analytic signal written into each file: exact lengths and timing at 24 kHz,
chunk boundaries, every format, channels; bad input; bounded memory."""

import math
import struct
import subprocess
import tracemalloc
import typing as tp

import numpy as np
import pytest
import sphn
import torch

from evals.librilight.codes_cache import encode_document
from evals.librilight.data import AudioFile, Document
from ttt_cli.audio import FRAME_SIZE, SAMPLE_RATE, iter_audio, load_audio
from ttt_cli.errors import InputError

RATES = (16000, 22050, 24000, 44100)


def tones(sr: int, n: int, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, tp.Callable]:
    """[C, n] sums of sines below both Nyquists, and the function giving them at any times (seconds)."""
    rng = np.random.default_rng(seed)
    f = rng.uniform(50, 0.45 * min(sr, SAMPLE_RATE), (channels, 24))
    ph = rng.uniform(0, 2 * np.pi, (channels, 24))
    amp = rng.uniform(0.005, 0.02, (channels, 24))

    def at(t: np.ndarray) -> np.ndarray:
        return np.stack([(amp[c, :, None] * np.sin(2 * np.pi * f[c, :, None] * t[None] + ph[c, :, None])).sum(0)
                         for c in range(channels)])

    return at(np.arange(n) / sr).astype(np.float32), at


def write(path, data: np.ndarray, sr: int):
    sphn.write_wav(str(path), np.atleast_2d(data).astype(np.float32), sr)
    return path


def float_wav(path, samples: np.ndarray, sr: int):
    """A mono 32-bit float WAV written by hand (sphn writes int16, which cannot hold NaN)."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sr, sr * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def expected_len(n: int, sr: int) -> int:
    return math.ceil(n * SAMPLE_RATE / sr - 1e-9)


def native_len(path) -> int:
    return sphn.FileReader(str(path)).decode_all().shape[-1]


# -- lengths and timing -----------------------------------------------------------------------------

@pytest.mark.parametrize("sr", RATES)
def test_length_is_exact(tmp_path, sr):
    n = int(3.031 * sr) + 7  # not a whole number of anything
    path = write(tmp_path / "a.wav", tones(sr, n)[0], sr)
    wav, info = load_audio(path)
    m = expected_len(n, sr)
    assert wav.shape == (m,) and wav.dtype == np.float32
    assert (info.samples, info.frames, info.sample_rate, info.channels, info.channel) == (m, m // FRAME_SIZE, sr, 1,
                                                                                          "mix")
    assert info.seconds == pytest.approx(n / sr, abs=1 / SAMPLE_RATE)
    stream_info, pieces = iter_audio(path, chunk_seconds=1.0)
    assert stream_info == info and sum(p.shape[0] for p in pieces) == m


# -- chunked reading against the signal itself --------------------------------------------------------

EDGE = int(0.05 * SAMPLE_RATE)  # where a cut-off sine rings at the file's two ends (not at chunk boundaries)


def _read_vs_ideal(path, at, chunk_seconds=1.0, channel=None, delay=0.0):
    """Reads `path` in pieces and whole; returns (pieces, max |error| of each against the analytic signal `at`
    (channel `channel`, or the mean of all) sampled at k / 24000 - delay, file ends excluded)."""
    info, pieces = iter_audio(path, channel, chunk_seconds=chunk_seconds)
    pieces = list(pieces)
    assert all(p.dtype == np.float32 and p.ndim == 1 for p in pieces)
    chunked = np.concatenate(pieces)
    whole, whole_info = load_audio(path, channel)
    assert whole_info == info and chunked.shape == whole.shape == (info.samples,)
    sig = at(np.arange(info.samples) / SAMPLE_RATE - delay)
    ideal = sig.mean(0) if channel is None else sig[channel]
    errs = [np.abs(x - ideal)[EDGE:-EDGE] for x in (chunked, whole)]
    return len(pieces), errs


@pytest.mark.parametrize("sr", RATES + (48000,))
def test_chunked_read_equals_the_signal(tmp_path, sr):
    """Chunk boundaries (1 s pieces), resampling and the length: sample k is the written signal at k / 24000
    (no resampler delay, no leading silence, the end not lost)."""
    x, at = tones(sr, int(7.3 * sr) + 11)
    path = write(tmp_path / "a.wav", x, sr)
    count, errs = _read_vs_ideal(path, at)
    assert count == 8
    for e in errs:
        assert e.max() < 3e-4  # int16 quantization and filter ripple
    wav, _ = load_audio(path)
    assert np.abs(wav[-2 * EDGE:]).max() > 0.05  # the last 100 ms are audio, not padding


CODECS = {  # (max error, rms error) against the signal; MP3 carries its codec delay (see below)
    "flac": (3e-4, 1e-4), "ogg": (0.1, 0.03), "mp3": (0.2, 0.06),
}


def codec_delay(tmp_path, ext: str, sr: int) -> int:
    """The delay in native samples that sox's encoder and sphn's decoder put on a file of this format, measured:
    a click (a Gaussian-windowed 2 kHz burst, 10 ms) at 0.5 s, encoded by sox, decoded at its own rate by sphn,
    found by cross-correlation. MP3 decoders keep the encoder's priming (LAME's 576 + the decoder's 529 samples
    with today's versions); other encoders and decoders differ, so it is measured, never assumed."""
    k = np.arange(-80, 81)
    burst = (0.5 * np.exp(-0.5 * (k / 12.0) ** 2) * np.cos(2 * np.pi * 2000 * k / sr)).astype(np.float32)
    x = np.zeros(2 * sr, np.float32)
    at = sr // 2
    x[at - 80:at + 81] = burst
    src = write(tmp_path / "click.wav", x, sr)
    enc = tmp_path / f"click.{ext}"
    r = subprocess.run(["sox", str(src), str(enc)], capture_output=True)
    assert r.returncode == 0, f"sox cannot write .{ext}: {r.stderr.decode()[-300:]}"
    y = sphn.FileReader(str(enc)).decode_all()[0]
    corr = np.correlate(y, burst, mode="valid")  # corr[j] = y[j:j + len(burst)] · burst
    delay = int(np.argmax(corr)) - (at - 80)
    assert corr.max() > 0.5 * float(burst @ burst), "the click did not come through the codec"
    return delay


@pytest.mark.parametrize("ext", list(CODECS))
def test_compressed_formats_equal_the_signal(tmp_path, ext):
    """An analytic signal written by sox into each format and read back in pieces (FLAC block by block; Ogg
    and MP3 do not seek sample-exactly and are decoded whole). The codec's own delay (MP3's priming, which is
    the file's content, not something the reader adds) is measured on a click first (`codec_delay`)."""
    sr = 16000

    def at(t):  # a chirp plus a sine: no periodicity, so a misaligned read cannot look right
        t = np.atleast_1d(t)
        return (0.3 * np.sin(2 * np.pi * (300 * t + 40 * t * t)) + 0.2 * np.sin(2 * np.pi * 1234.5 * t + 1.1))[None]

    src = write(tmp_path / "a.wav", at(np.arange(sr * 6 - 5) / sr)[0], sr)
    path = tmp_path / f"a.{ext}"
    r = subprocess.run(["sox", str(src), str(path)], capture_output=True)
    # scripts/test.sh checks that sox can write (and sphn read) these formats, installing handlers if needed
    assert r.returncode == 0, f"sox cannot write .{ext}: {r.stderr.decode()[-300:]}"
    native = codec_delay(tmp_path, ext, sr)
    assert native == 0 if ext == "flac" else 0 <= native < sr // 4, native  # lossless: none; others: < 250 ms
    delay = native / sr
    count, errs = _read_vs_ideal(path, at, delay=delay)
    assert count >= 6
    max_err, rms = CODECS[ext]
    for e in errs:
        e = e[int(delay * SAMPLE_RATE):]
        assert e.max() < max_err and np.sqrt(np.mean(e ** 2)) < rms, (e.max(), np.sqrt(np.mean(e ** 2)))
    assert load_audio(path)[1].samples == expected_len(native_len(path), 16000)


def test_truncated_file_reads_what_is_there(tmp_path):
    """A header promising more than the data: the length is the data's, not padded with silence."""
    full = write(tmp_path / "full.wav", tones(16000, 16000 * 8)[0], 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:44 + 2 * 16000 * 3])
    n = native_len(cut)
    assert 0 < n < 16000 * 8
    stream_info, pieces = iter_audio(cut, chunk_seconds=1.0)
    assert stream_info.samples == expected_len(n, 16000) == sum(p.shape[0] for p in pieces)


# -- channels ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sr", (16000, 24000))
def test_stereo_mix_and_channel(tmp_path, sr):
    """Mix-down = the mean of the channels' signals, --channel N = that channel's, read in pieces and whole."""
    x, at = tones(sr, int(5.2 * sr), channels=2)
    path = write(tmp_path / "st.wav", x, sr)
    infos = [load_audio(path, channel=c)[1] for c in (None, 0, 1)]
    assert [(i.channels, i.channel) for i in infos] == [(2, "mix"), (2, "0"), (2, "1")]
    left, right = (load_audio(path, channel=c)[0] for c in (0, 1))
    assert np.abs(left - right).max() > 0.01  # the channels differ
    for channel in (None, 0, 1):
        count, errs = _read_vs_ideal(path, at, channel=channel)
        assert count == 6 and all(e.max() < 3e-4 for e in errs), channel
    with pytest.raises(InputError, match="has 2 channel.*--channel 2 does not exist"):
        iter_audio(path, channel=2)


# -- bad input ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(tmp_path):
    good = write(tmp_path / "good.wav", tones(16000, 16000)[0], 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio\n" * 50)
    (tmp_path / "header.wav").write_bytes(good.read_bytes()[:30])
    write(tmp_path / "tiny.wav", np.zeros(1000, np.float32), 24000)          # 42 ms
    write(tmp_path / "edge.wav", np.zeros(1279, np.float32), 16000)          # 1919 samples at 24 kHz
    write(tmp_path / "frame.wav", np.zeros(1280, np.float32), 16000)         # exactly one frame
    x = tones(24000, 24000)[0][0]
    x[5000] = np.nan
    float_wav(tmp_path / "nan.wav", x, 24000)
    x[5000] = np.inf
    float_wav(tmp_path / "inf.wav", x, 24000)
    cases = {
        "missing.wav": "no such file",
        ".": "is a directory",
        "empty.wav": r"empty file \(0 bytes\)",
        "text.wav": "cannot decode as audio",
        "header.wav": "cannot decode as audio",
        "tiny.wav": r"41.7 ms of audio \(1000 samples at 24 kHz\) is shorter than one 80 ms frame",
        "edge.wav": r"\(1919 samples at 24 kHz\) is shorter than one 80 ms frame",
        "nan.wav": r"contains NaN or infinite samples \(the first at 0.21 s\)",
        "inf.wav": "contains NaN or infinite samples",
    }
    for name, message in cases.items():
        path = tmp_path / name
        for read in (load_audio, iter_audio):
            with pytest.raises(InputError, match=message) as e:
                read(path)
            assert str(e.value).startswith(str(path))
    assert load_audio(tmp_path / "frame.wav")[1].frames == 1


def test_nan_found_part_way_through_a_long_file(tmp_path):
    """Past the first chunks NaN is found by the iterator, after the good pieces before it."""
    x = tones(24000, 24000 * 8)[0][0]
    x[24000 * 6 + 10] = np.nan
    info, pieces = iter_audio(float_wav(tmp_path / "nan.wav", x, 24000), chunk_seconds=1.0)
    got = []
    with pytest.raises(InputError, match=r"NaN or infinite samples \(the first at 6.00 s\)"):
        for p in pieces:
            got.append(p)
    assert info.samples == 24000 * 8 and sum(p.shape[0] for p in got) == 24000 * 6
    with pytest.raises(InputError, match="NaN"):
        load_audio(tmp_path / "nan.wav")


# -- memory -------------------------------------------------------------------------------------------------------

def _iteration_peak(path) -> tuple[int, int]:
    """(peak bytes numpy allocated while iterating `path` in 10 s pieces, bytes of its whole 24 kHz waveform)."""
    tracemalloc.start()  # numpy registers its buffers with tracemalloc
    try:
        info, pieces = iter_audio(path, chunk_seconds=10.0)
        total, biggest = 0, 0
        for p in pieces:
            total += p.shape[0]
            biggest = max(biggest, p.shape[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == info.samples and biggest == 10 * SAMPLE_RATE
    return peak, info.samples * 4


def test_iterating_a_long_file_keeps_memory_bounded(tmp_path):
    """Stereo, so a whole-file read would also show up as a traced full-length mixdown."""
    sr, rng = 16000, np.random.default_rng(0)
    peaks = {}
    for minutes in (2, 10):
        x = rng.standard_normal((2, sr * 60 * minutes), dtype=np.float32) * 0.05
        path = write(tmp_path / f"{minutes}.wav", x, sr)
        del x
        peaks[minutes] = _iteration_peak(path)
    (short, _), (peak, whole) = peaks[2], peaks[10]
    assert whole == sr * 60 * 10 * 3 // 2 * 4
    assert peak < 1.2 * short, f"peak {peak / 2**20:.1f} MiB for 10 min, {short / 2**20:.1f} MiB for 2 min"
    assert peak < whole / 5, f"peak {peak / 2**20:.1f} MiB while iterating a {whole / 2**20:.0f} MiB waveform"


# -- the eval's encoder input ---------------------------------------------------------------------------------------

class _FakeMimi:
    num_codebooks = 2


def test_encode_document_streams_files_in_pieces(tmp_path, monkeypatch):
    """encode_document feeds each file's pieces (never a whole file) and records exact boundaries."""
    fed: list[int] = []

    def fake_encode_stream(mimi, chunks, block_frames, device):
        buf = 0
        for piece in chunks:
            fed.append(piece.shape[0])
            buf += piece.shape[0]
            while buf >= FRAME_SIZE:
                buf -= FRAME_SIZE
                yield torch.zeros(2, 1, dtype=torch.long)

    import ttt_cli.codes
    monkeypatch.setattr(ttt_cli.codes, "encode_stream", fake_encode_stream)
    monkeypatch.setattr(iter_audio, "__defaults__", (None, 1.0))  # 1 s pieces from short files
    lens = [(16000, 16000 * 3 + 1), (44100, 44100 * 4 + 3), (24000, 24000 * 2 + 5)]
    files = [write(tmp_path / f"{i}.wav", tones(sr, n, seed=i)[0], sr) for i, (sr, n) in enumerate(lens)]
    y = tones(24000, 24000 * 4)[0][0]
    y[24000 * 3] = np.nan
    files.insert(2, float_wav(tmp_path / "nan.wav", y, 24000))  # bad from 3 s: its first 3 s are kept
    (tmp_path / "bad.wav").write_text("not audio")
    files.insert(1, tmp_path / "bad.wav")
    doc = Document("s/b", "s", "b", [AudioFile(p, 0.0) for p in files])

    dc = encode_document(_FakeMimi(), doc)
    samples = [expected_len(n, sr) for sr, n in lens]
    samples.insert(2, 24000 * 3)
    starts = np.cumsum([0] + samples[:-1])
    assert [f.samples for f in dc.files] == samples and dc.samples == sum(samples) == sum(fed)
    assert [f.start_step for f in dc.files] == [s // FRAME_SIZE for s in starts]
    assert [f.end_step for f in dc.files] == [(s + n) // FRAME_SIZE for s, n in zip(starts, samples)]
    assert [f.truncated for f in dc.files] == [False, False, True, False]
    assert [s.path for s in dc.skipped] == [str(tmp_path / "bad.wav")]
    assert len(dc.warnings) == 1 and "NaN" in dc.warnings[0] and "first 3.00 s" in dc.warnings[0]
    assert max(fed) <= SAMPLE_RATE and dc.steps == sum(samples) // FRAME_SIZE

    fed.clear()
    cut = encode_document(_FakeMimi(), doc, max_seconds=4.5)  # inside the second good file
    assert [f.samples for f in cut.files] == [samples[0], 4.5 * SAMPLE_RATE - samples[0]]
    assert [f.truncated for f in cut.files] == [False, True] and cut.samples == sum(fed) == 4.5 * SAMPLE_RATE
