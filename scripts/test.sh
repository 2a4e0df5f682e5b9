#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The eval and audio tests synthesize speech (espeak-ng) and write FLAC/Ogg/MP3 (sox and its format
# handlers): check that they work, installing what is missing when we may.
./scripts/check-tools.sh
export NO_TORCH_COMPILE=1
# One worker per core (pytest-xdist), whole files per worker so module fixtures load once; each test
# runs with one intra-op thread (tests/conftest.py). TTT_TEST_WORKERS=0 runs in this process.
exec .venv/bin/python -m pytest -q -n "${TTT_TEST_WORKERS:-auto}" --dist loadfile "$@"
