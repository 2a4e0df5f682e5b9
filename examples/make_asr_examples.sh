#!/usr/bin/env bash
# Regenerates the `ttt eval asr` example (examples/asr/): short English clips synthesised with
# espeak-ng, each with a same-stem .txt reference = exactly the text espeak-ng was given, and
# tests/data/asr/manifest.jsonl, the same recordings as a JSONL manifest (deterministic for a given
# espeak-ng; made with espeak-ng 1.51 and sox).
#   launch.flac     mono, 16 kHz, FLAC    numbers, a year and punctuation (normalisation matters)
#   library.wav     mono, 24 kHz, 16-bit  Mimi's native rate; contractions and a title
#   directions.flac mono, 16 kHz, FLAC    the longest clip (~10 s), for position bins
set -euo pipefail
cd "$(dirname "$0")/asr"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() {  # say STEM RATE EXT VOICE SPEED TEXT
  printf '%s\n' "$6" > "$1.txt"
  espeak-ng -v "$4" -s "$5" -w "$tmp/$1.wav" "$6"
  sox "$tmp/$1.wav" -r "$2" -c 1 -b 16 "$1.$3"
}

say launch 16000 flac en-us 155 \
  "In 1969, about twenty five thousand people watched the launch from the beach. It cost \$3.5 million."
say library 24000 wav en-us+f3 150 \
  "Mr. Smith won't open the library on Sunday, but it's open every other day until 8 o'clock."
say directions 16000 flac en-us 150 \
  "Turn left at the second traffic light, walk past the old bakery, and you will find the museum on your right, next to a small park with a fountain."
soxi ./*.flac ./*.wav

mkdir -p ../../tests/data/asr
python3 - <<'PY'
import json, pathlib
out = pathlib.Path("../../tests/data/asr/manifest.jsonl")
lines = [json.dumps({"audio": f"../../../examples/asr/{a}", "text": pathlib.Path(a).with_suffix(".txt").read_text().strip()})
         for a in ("launch.flac", "library.wav", "directions.flac")]
out.write_text("\n".join(lines) + "\n")
PY
