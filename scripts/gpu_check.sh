#!/usr/bin/env bash
# Check the CUDA path on a GPU machine in under 5 minutes: the CUDA tests (tests/test_gpu.py), then
# sweep trials per hour with 1, 4 and 8 trials sharing one GPU (benchmarks/gpu_packing.py).
# Prints a short report and writes it to results/gpu_check/report.txt. Without a CUDA device it
# prints "no CUDA device: skipped" and exits 0.
#
# Environment: PYTHON (default .venv/bin/python, else python3), a torch with CUDA installed there
# (the Docker image has one), GPU_CHECK_STEPS (steps per benchmark trial, default 200).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
STEPS="${GPU_CHECK_STEPS:-200}"
OUTPUT=results/gpu_check
# Time limits per stage, in seconds: together under 5 minutes.
TEST_LIMIT=120
BENCHMARK_LIMIT=170

if ! "$PYTHON" -c "import torch" 2> /dev/null; then
    echo "error: $PYTHON cannot import torch. Run make install, or set PYTHON to an interpreter with torch." >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: skipped"
    exit 0
fi

mkdir -p "$OUTPUT"
start=$SECONDS
device=$("$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')")

test_status=0
timeout "$TEST_LIMIT" "$PYTHON" -m pytest -q -rs tests/test_gpu.py > "$OUTPUT/tests.log" 2>&1 || test_status=$?
benchmark_status=0
timeout "$BENCHMARK_LIMIT" "$PYTHON" benchmarks/gpu_packing.py --steps "$STEPS" --packing 1,4,8 \
    --output "$OUTPUT" > "$OUTPUT/benchmark.log" 2>&1 || benchmark_status=$?

{
    echo "GPU check: $device"
    echo
    echo "CUDA tests (tests/test_gpu.py, exit status $test_status):"
    grep -E "^(FAILED|ERROR|SKIPPED) |[0-9]+ (passed|failed|skipped|errors?)" "$OUTPUT/tests.log" | sed 's/^/  /' || true
    if [[ $test_status -eq 124 ]]; then echo "  timed out after ${TEST_LIMIT} s"; fi
    echo
    echo "Trials per hour with k trials sharing one GPU (benchmarks/gpu_packing.py, exit status $benchmark_status):"
    sed -n '/-step trials/,$p' "$OUTPUT/benchmark.log" | sed 's/^/  /'
    if [[ $benchmark_status -eq 124 ]]; then
        echo "  timed out after ${BENCHMARK_LIMIT} s; rows measured so far: $OUTPUT/gpu_packing.csv"
    fi
    echo
    echo "took $((SECONDS - start)) s; logs: $OUTPUT/tests.log, $OUTPUT/benchmark.log"
} | tee "$OUTPUT/report.txt"

if [[ $test_status -ne 0 || $benchmark_status -ne 0 ]]; then
    exit 1
fi
