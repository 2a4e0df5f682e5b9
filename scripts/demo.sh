#!/usr/bin/env bash
# One command for a newcomer: set up .venv, then stream the bundled example through the offline
# `tiny` model with TTT on (dialog mode: Moshi's text and audio reply).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/ttt infer examples/hello.wav --model tiny --out out/demo --greedy --overwrite "$@"
