#!/usr/bin/env bash
# Checks that the tools the test suite drives can do what it asks of them, not just that they exist:
# espeak-ng synthesizes speech, and sox writes the formats the tests read back (WAV, FLAC, Ogg Vorbis,
# MP3 — sox's format handlers come in separate packages, so a `sox` binary alone is not enough); as
# root, util-linux's setpriv runs the read-only-directory tests in a child that obeys permission bits.
# What is missing is installed with apt-get when we may (root); otherwise exit 2 naming it.
set -uo pipefail

probe() {  # prints one line per capability that fails
  local tmp
  tmp=$(mktemp -d)
  if ! { command -v espeak-ng >/dev/null && espeak-ng -w "$tmp/speech.wav" "test" >/dev/null 2>&1 \
         && [ -s "$tmp/speech.wav" ]; }; then
    echo "espeak-ng: synthesize speech"
  fi
  if ! command -v sox >/dev/null; then
    echo "sox"
  elif ! sox -n -r 16000 -c 1 -b 16 "$tmp/tone.wav" synth 0.2 sine 440 >/dev/null 2>&1; then
    echo "sox: write .wav"
  else
    local ext
    for ext in flac ogg mp3; do
      if ! { sox "$tmp/tone.wav" "$tmp/tone.$ext" >/dev/null 2>&1 && [ -s "$tmp/tone.$ext" ]; }; then
        echo "sox: write .$ext"
      fi
    done
  fi
  if [ "$(id -u)" = 0 ] && ! command -v setpriv >/dev/null; then
    echo "setpriv (util-linux): read-only directories for root"
  fi
  rm -rf "$tmp"
}

missing=$(probe)
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test] installing espeak-ng, sox and its format handlers, util-linux (apt-get); missing: $(echo "$missing" | paste -sd ';' -)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox libsox-fmt-all util-linux) >/dev/null
  missing=$(probe)
fi
if [ -n "$missing" ]; then
  echo "[test] the tests need these and they do not work here: $(echo "$missing" | paste -sd ';' -)." >&2
  echo "[test] install them, e.g. apt-get install espeak-ng sox libsox-fmt-all util-linux" >&2
  exit 2
fi
