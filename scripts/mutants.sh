#!/usr/bin/env bash
# Mutation check (not part of CI): applies each deliberate break listed in scripts/mutants.tsv to a
# throw-away copy of the tracked files, runs the tests named for it, and prints caught/missed/stale.
# Usage: scripts/mutants.sh [--only ID[,ID]] [--list] [--keep-logs]. Exit 0 when every break is caught.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/mutants.py "$@"
