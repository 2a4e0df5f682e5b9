#!/usr/bin/env bash
# Creates (or reuses) .venv with ttt installed editable plus test extras. Re-installs only when
# pyproject.toml changed since the last install, so repeated runs take a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ttt-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import ttt_cli, moshi" 2>/dev/null; then
  echo "[setup] installing ttt and its dependencies into .venv (first time: a few minutes, ~7 GB for torch)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
