#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export NO_TORCH_COMPILE=1
exec .venv/bin/python -m pytest -q "$@"
