#!/usr/bin/env bash
# Golden files from the fine-tuning fork's own trainer and loader (SPEC §4.3 "Fidelity"): trains tiny
# checkpoints of each kind with AlufRon/moshi_in_place's `moshi-finetune` (CPU, fp32, world size 1) and
# records its model's logits on fixed codes as its `run_inference` loader builds it. Writes
# tests/data/fork_golden/ (read by tests/test_fork_golden.py). For developers; CI does not run it.
#
# Usage: scripts/make-fork-golden.sh FORK [--out DIR] [--work DIR]
#   FORK   a checkout of github.com/AlufRon/moshi_in_place, or a bare git mirror of it (HEAD is used).
#          Only read: the fork's files are run from a copy (mirror) or in place without bytecode files.
#   --out  where the golden set goes (default tests/data/fork_golden; replaced as a whole at the end).
#   --work scratch folder (default: a temporary one, removed at exit). Its venv is reused if present.
# Needs: .venv (scripts/setup.sh), git, network access to PyPI once (fire, simple-parsing, tensorboard:
# the trainer's imports that ttt does not have; torch, moshi's deps etc. are the project's, via a .pth).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$ROOT/.venv/bin/python"
FORK_DEPS=(fire==0.7.1 simple-parsing==0.1.9 tensorboard==2.21.0)
KINDS=(full ttt-only lora-ttt ttt-unfreeze ttt-only-yarn4)

usage() { sed -n '7,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
FORK=$1; shift
OUT="$ROOT/tests/data/fork_golden"; WORK=""
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$(realpath -m "$2"); shift 2 ;;
    --work) WORK=$(realpath -m "$2"); shift 2 ;;
    *) usage ;;
  esac
done
[ -x "$PY" ] || { echo "no $PY: run scripts/setup.sh first" >&2; exit 2; }
[ -e "$FORK" ] || { echo "no such fork checkout or mirror: $FORK" >&2; exit 2; }
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
started=$(date +%s)
say() { echo "[fork-golden $(( $(date +%s) - started ))s] $*" >&2; }

# 1. The fork's code: its `moshi` package and `moshi-finetune/` (trainer), at a known commit.
if [ "$(git -C "$FORK" rev-parse --is-bare-repository 2>/dev/null || true)" = true ]; then
  commit=$(git -C "$FORK" rev-parse HEAD)
  rm -rf "$WORK/fork"; mkdir -p "$WORK/fork"
  # only the two folders: a mirror may lack the blobs of the large files elsewhere in the tree
  # (git may still complain about such a blob on stderr; the archive of these paths is complete)
  git -C "$FORK" archive HEAD moshi/moshi moshi-finetune/finetune moshi-finetune/train.py 2>"$WORK/archive.err" \
    | tar -x -C "$WORK/fork" || { cat "$WORK/archive.err" >&2; exit 1; }
  SRC="$WORK/fork"
else
  SRC=$(realpath "$FORK")
  commit=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)
  if [ "$commit" != unknown ] && [ -n "$(git -C "$SRC" status --porcelain -- moshi/moshi moshi-finetune 2>/dev/null)" ]; then
    commit="$commit (with local changes)"
  fi
fi
[ -f "$SRC/moshi/moshi/moshi/modules/ttt_module.py" ] && [ -f "$SRC/moshi-finetune/train.py" ] \
  || { echo "$FORK is not moshi_in_place: no moshi/moshi/moshi/modules/ttt_module.py or moshi-finetune/train.py" >&2; exit 2; }
say "fork at $commit"

# 2. A venv for the fork: its moshi before anything else, then the project's torch & co (nothing big
#    downloaded), then the trainer's few extra packages from PyPI.
VENV="$WORK/venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n%s\n' "$SRC/moshi/moshi" "$SRC/moshi-finetune" > "$site/00-moshi-in-place.pth"
"$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' > "$site/01-project-packages.pth"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${FORK_DEPS[@]}"
got=$("$VENV/bin/python" -c 'import moshi.modules.ttt_module as m; print(m.__file__)')
case $got in "$SRC"/*) ;; *) echo "the fork venv imports moshi from $got, not from $SRC" >&2; exit 1 ;; esac
export PYTHONDONTWRITEBYTECODE=1 NO_TORCH_COMPILE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# 3. The base: the `tiny` preset written by our own tool, as a plain moshi checkpoint (no `ttt` section:
#    the fork trains from plain Moshi; moshi would pass unknown config keys to LMModel).
rm -rf "$WORK/tiny-ttt" "$WORK/base"
"$ROOT/.venv/bin/ttt" init-checkpoint --preset tiny --copy-base --out "$WORK/tiny-ttt" >&2
mkdir -p "$WORK/base"
cp "$WORK/tiny-ttt"/{model.safetensors,mimi.safetensors,mimi_config.json,tokenizer.model} "$WORK/base/"
"$PY" - "$WORK/tiny-ttt/config.json" "$WORK/base/config.json" <<'EOF'
import json, sys
cfg = json.loads(open(sys.argv[1]).read())
cfg.pop("ttt")
open(sys.argv[2], "w").write(json.dumps(cfg, indent=2) + "\n")
EOF
say "base written"

# 4. Data, training (one trainer run per kind), recording (the fork's loader, per checkpoint).
DRIVER=("$VENV/bin/python" "$ROOT/scripts/fork_golden.py")
"${DRIVER[@]}" data "$WORK/data"
rm -rf "$WORK/runs" "$WORK/golden"
for kind in "${KINDS[@]}"; do
  "${DRIVER[@]}" train "$kind" --work "$WORK" --base "$WORK/base" > "$WORK/train-$kind.log" 2>&1 \
    || { tail -40 "$WORK/train-$kind.log" >&2; echo "training $kind failed (log: $WORK/train-$kind.log)" >&2; exit 1; }
  say "trained $kind"
  "${DRIVER[@]}" record "$kind" --work "$WORK" --base "$WORK/base" --out "$WORK/golden/$kind" \
    > "$WORK/record-$kind.log" 2>&1 \
    || { tail -40 "$WORK/record-$kind.log" >&2; echo "recording $kind failed (log: $WORK/record-$kind.log)" >&2; exit 1; }
  # the checkpoint exactly as the trainer left it (RUN/checkpoints/checkpoint_NNNNNN/consolidated/)
  cp -r "$WORK/runs/$kind/checkpoints" "$WORK/golden/$kind/"
  say "recorded $kind"
done

# 5. The base files the tests need, golden.json (how it was made, checksums), then swap into place.
mkdir -p "$WORK/golden/base"
cp "$WORK/base/config.json" "$WORK/base/model.safetensors" "$WORK/golden/base/"
"${DRIVER[@]}" manifest --work "$WORK" --base "$WORK/base" --out "$WORK/golden" --commit "$commit" \
  --seconds $(( $(date +%s) - started ))
[ -f "$OUT/README.md" ] && cp "$OUT/README.md" "$WORK/golden/"
rm -rf "$OUT.new"; cp -r "$WORK/golden" "$OUT.new"
rm -rf "$OUT"; mv "$OUT.new" "$OUT"
say "wrote $OUT ($(du -sh "$OUT" | cut -f1))"
