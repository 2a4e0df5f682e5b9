"""Builds a tiny LibriLight-style dataset for the eval tests from espeak-ng clips synthesized at test time."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import sphn

# speaker -> book -> [(file stem, sentence)]; names need natural sort (20 < 100, book2 < book10, 2 < 10).
LAYOUT = {
    "20": {
        "book2": [("1", "It was the best of times, it was the worst of times."),
                  ("2", "The quick brown fox jumps over the lazy dog."),
                  ("10", "Call me Ishmael. Some years ago I went to sea.")],
        "book10": [("1", "All happy families are alike.")],
    },
    "100": {
        "7": [("1", "In the beginning the sky was dark."),
              ("2", None),  # broken file
              ("3", "Then the sun came up over the hills.")],
    },
}
ORDER = ["20/book2", "20/book10", "100/7"]  # natural order of document ids
BROKEN = "100/7/2.flac"
BAD_JSON = "20/book10/1.json"


def _synth(text: str, out: Path, tmp: Path) -> None:
    wav = tmp / (out.stem + ".wav")
    subprocess.run(["espeak-ng", "-s", "190", "-w", str(wav), text], check=True, capture_output=True)
    # LibriLight is 16 kHz FLAC: exercise resampling and FLAC decoding.
    subprocess.run(["sox", str(wav), "-r", "16000", str(out)], check=True, capture_output=True)
    wav.unlink()


def build(root: Path) -> Path:
    """Writes the dataset under `root` (created) and returns it.

    Per-file JSON follows LibriLight's fields (`speaker`, `book_meta`, `snr`, `voice_activity`);
    one JSON is malformed (the file must still be used) and one FLAC is garbage (skipped).
    """
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        raise RuntimeError("the eval tests need espeak-ng and sox on PATH to synthesize their dataset.")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".synth"
    tmp.mkdir(exist_ok=True)
    for spk, books in LAYOUT.items():
        for book, files in books.items():
            d = root / spk / book
            d.mkdir(parents=True, exist_ok=True)
            for stem, text in files:
                audio = d / f"{stem}.flac"
                if text is None:
                    audio.write_bytes(b"fLaC\x00\x00\x00\x22" + bytes(range(256)) * 4)  # a truncated header
                    continue
                _synth(text, audio, tmp)
                meta = {"speaker": spk, "snr": 20.5 + int(stem),
                        "book_meta": {"id": book, "title": f"Book {book} of speaker {spk}", "language": "English"},
                        "voice_activity": [[0.1, 0.9], [1.0, 1.5]]}
                (d / f"{stem}.json").write_text(json.dumps(meta))
    (root / BAD_JSON).write_text("{not json")
    shutil.rmtree(tmp)
    return root


def seconds(root: Path, doc_id: str) -> list[float]:
    """Durations in seconds of a document's readable files in order, read from the files the synthesizer
    wrote (espeak-ng's voice and speed vary between its versions: no duration is assumed)."""
    spk, book = doc_id.split("/")
    return [sphn.FileReader(str(root / spk / book / f"{stem}.flac")).duration_sec
            for stem, text in LAYOUT[spk][book] if text is not None]


def step_bounds(root: Path, doc_id: str, frame: int = 1920, sr: int = 24000) -> list[int]:
    """The 80 ms step at which each readable file of a document starts, then the document's step count, once
    its files are played one after the other at 24 kHz (each file's length there: ceil(native samples ·
    24000 / native rate)); read from the files, like `seconds`."""
    spk, book = doc_id.split("/")
    starts, total = [], 0
    for stem, text in LAYOUT[spk][book]:
        if text is None:
            continue
        starts.append(total // frame)
        r = sphn.FileReader(str(root / spk / book / f"{stem}.flac"))
        total += math.ceil(r.decode_all().shape[-1] * sr / r.sample_rate - 1e-9)
    return starts + [total // frame]
