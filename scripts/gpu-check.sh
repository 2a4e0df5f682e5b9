#!/usr/bin/env bash
# One command for the day a GPU is at hand (SPEC §8.6-8.8): in at most 8 minutes it runs the CUDA tests (moshi's
# CUDA graphs captured and replayed with TTT on = eager, over refills, exec masks, resets and recording),
# `ttt infer` on moshi-7b-layer and on a bf16 moshi-7b-random batch of three files, and the GPU figures of
# `ttt bench`; it writes one Markdown report. Without CUDA it says so and exits 0 at once.
#
#   scripts/gpu-check.sh [REPORT]        REPORT: the report file (default gpu-check-report.md)
#
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_BENCH_MODEL (default moshi-7b-random; two copies,
# TTT and plain moshi, are loaded: ~2 x 15 GiB in bf16), GPU_CHECK_BENCH_STEPS (default 128),
# GPU_CHECK_COMPILE=1 to keep moshi's torch.compile on (off by default: compiling would eat the time budget).
# Exit code: 0 when every step passed (or no CUDA), 1 when one failed (the report says which).
set -uo pipefail
REPORT="$(realpath -m "${1:-gpu-check-report.md}")"
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check; exit 0."
    exit 0
fi

BUDGET=470  # seconds for all steps together (8 minutes, less the report)
BENCH_MODEL="${GPU_CHECK_BENCH_MODEL:-moshi-7b-random}"
BENCH_STEPS="${GPU_CHECK_BENCH_STEPS:-128}"
[ "${GPU_CHECK_COMPILE:-0}" = 1 ] || export NO_TORCH_COMPILE=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
TTT=("$PY" -m ttt_cli)
FAILED=()
STEPS_MD="$WORK/steps.md"
: > "$STEPS_MD"

# run NAME CAP_SECONDS CMD...: runs CMD with at most CAP seconds (less if the budget is nearly spent),
# appends its command, exit code, time and output tail to the report.
run() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET - SECONDS))
    local limit=$((cap < left ? cap : left))
    local start=$SECONDS rc
    if [ "$limit" -lt 10 ]; then
        rc="not run (time budget spent)"
    else
        echo "gpu-check: $name (at most ${limit}s) ..." >&2
        timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
        rc=$?
        [ "$rc" = 124 ] && rc="124 (stopped after ${limit}s)"
    fi
    [ "$rc" = 0 ] || FAILED+=("$name")
    {
        echo "## $name"
        echo
        echo "\`$*\`"
        echo
        echo "exit code: $rc; $((SECONDS - start)) s"
        echo
        echo '```'
        tail -n 40 "$WORK/$name.err" 2>/dev/null
        "$PY" - "$WORK/$name.out" <<'EOF' 2>/dev/null || tail -c 4000 "$WORK/$name.out"
import json, sys
text = open(sys.argv[1]).read()
try:
    out = json.loads(text)
except ValueError:  # not a --json command (pytest): its output as it is
    print(text[-4000:])
    raise SystemExit
scalars = lambda d: {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}
print("JSON:", json.dumps(scalars(out)))
for r in out.get("results", []):  # ttt infer: one line per file, its scalar fields
    print("  result:", json.dumps(scalars(r)))
EOF
        echo '```'
        echo
    } >> "$STEPS_MD"
    echo "gpu-check: $name: exit $rc in $((SECONDS - start)) s" >&2
}

# three input files of different lengths (4, 7, 10 s: the batch's slots refill out of phase)
"$PY" - "$WORK" <<'EOF'
import math, random, struct, sys, wave
for name, seconds in (("a", 4), ("b", 7), ("c", 10)):
    rng = random.Random(seconds)
    with wave.open(f"{sys.argv[1]}/{name}.wav", "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(24000)
        n = 24000 * seconds
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 220 * (1 + t // 12000 % 3) * t
                                                                       / 24000) + rng.gauss(0, 800)))
                               for t in range(n)))
EOF

run cuda-tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_graph_safe.py::test_cuda_graphs_stay_on_with_ttt_on \
    "tests/test_graph_replay.py::test_cuda_graphs_replayed_equal_eager_over_refills_masks_resets"
if grep -q "skipped" "$WORK/cuda-tests.out"; then FAILED+=("cuda-tests (some skipped on a CUDA machine)"); fi
run infer-7b-layer 75 "${TTT[@]}" infer "$WORK/a.wav" --model moshi-7b-layer --device cuda --greedy \
    --out "$WORK/out-layer" --json
run infer-7b-random-bf16-batch 120 "${TTT[@]}" infer "$WORK/a.wav" "$WORK/b.wav" "$WORK/c.wav" \
    --model moshi-7b-random --device cuda --dtype bf16 --batch-size 3 --greedy --telemetry "$WORK/telemetry" \
    --out "$WORK/out-7b" --json
run bench-gpu 240 "${TTT[@]}" bench --model "$BENCH_MODEL" --device cuda --dtype bf16 --variant inplace \
    --steps "$BENCH_STEPS" --only gpu_rtf_b1,gpu_rtf_b8,gpu_rtf_ratio_b1,gpu_rtf_ratio_b8,gpu_memory_per_stream_error \
    --json --out "$WORK/bench.json"

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    "$PY" - "$WORK/bench.json" <<'EOF'
import json, subprocess, sys
import torch
p = torch.cuda.get_device_properties(0)
print(f"- device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
ver = subprocess.run([sys.executable, "-m", "ttt_cli", "--version"], capture_output=True, text=True).stdout.strip()
print(f"- versions: {ver}")
try:
    figs = json.load(open(sys.argv[1]))["figures"]
except Exception as e:
    print(f"- bench figures: none ({type(e).__name__}: {e})")
else:
    print("\n| figure | value | target | pass |\n|---|---|---|---|")
    for f in figs:
        print(f"| {f['name']} | {f['value']} | {f.get('target')} | {f.get('pass')} |")
EOF
    echo
    if [ ${#FAILED[@]} -eq 0 ]; then echo "All steps passed in $SECONDS s."; else
        echo "Failed: ${FAILED[*]} ($SECONDS s)."; fi
    echo
    cat "$STEPS_MD"
} > "$REPORT"
echo "gpu-check: report written to $REPORT" >&2
[ ${#FAILED[@]} -eq 0 ]
