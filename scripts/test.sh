#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The eval and audio tests synthesize speech (espeak-ng) and convert formats (sox, with its
# mp3/ogg handlers): install them when missing and we may.
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing espeak-ng and sox (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox libsox-fmt-all) >/dev/null
  else
    echo "[test] the tests need espeak-ng and sox: install them (e.g. apt-get install espeak-ng sox libsox-fmt-all)" >&2
    exit 2
  fi
fi
export NO_TORCH_COMPILE=1
exec .venv/bin/python -m pytest -q "$@"
