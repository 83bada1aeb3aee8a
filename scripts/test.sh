#!/usr/bin/env bash
# Set-up plus the whole test suite (Triton kernels under the interpreter, CPU
# paths, the native extension, the ahead-of-time kernel report).
#
#   bash scripts/test.sh [pytest args]   CPU lane (what CI runs)
#   bash scripts/test.sh --gpu           GPU lane: the Triton/CUDA tests compiled on the GPU (bf16 included),
#                                        then the GPU benchmark suite into benchmarks/results/<gpu>/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY="${PYTHON:-python3}"
if [[ "${1:-}" == "--gpu" ]]; then
    shift
    unset TRITON_INTERPRET
    export FASTPEFT_TEST_GPU=1
    "$PY" -m pytest -q tests/kernels tests/ops tests/native/test_nf4_cuda.py "$@"
    gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
    exec "$PY" -m benchmarks --device cuda --kernel-report --out "benchmarks/results/$gpu"
fi
# The CMake build of csrc/ is part of the suite (about a minute on 2 cores).
export FASTPEFT_TEST_CMAKE="${FASTPEFT_TEST_CMAKE:-1}"
exec "$PY" -m pytest -q "$@"
