#!/usr/bin/env bash
# Regenerates the bundled example clips with espeak-ng and sox (deterministic for a given espeak-ng).
#   hello.wav     ~4 s, mono, 24 kHz, 16-bit      (Mimi's native rate: no resampling)
#   weather.flac  ~5 s, stereo, 16 kHz, FLAC      (exercises resampling, mix-down and --channel)
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

espeak-ng -v en-us -s 150 -w "$tmp/hello.wav" \
  "Hello, this is a short test of streaming inference with test time training."
sox "$tmp/hello.wav" -r 24000 -c 1 -b 16 hello.wav

# Left channel: a female-sounding voice; right channel: the same text, slower and lower.
text="The weather today is sunny with a light breeze, and rain is expected tomorrow."
espeak-ng -v en-us+f3 -s 160 -w "$tmp/left.wav" "$text"
espeak-ng -v en-us -s 140 -p 30 -w "$tmp/right.wav" "$text"
sox "$tmp/left.wav" -r 16000 "$tmp/left16.wav"
sox "$tmp/right.wav" -r 16000 "$tmp/right16.wav"
sox -M "$tmp/left16.wav" "$tmp/right16.wav" -b 16 weather.flac
soxi hello.wav weather.flac
