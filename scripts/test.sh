#!/usr/bin/env bash
# Set-up plus the whole test suite (Triton kernels under the interpreter, CPU
# paths, the native extension, the ahead-of-time kernel report).
#
#   bash scripts/test.sh [pytest args]   CPU lane (what CI runs)
#   bash scripts/test.sh --gpu [DIR]     GPU lane: scripts/gpu_lane.sh DIR (default gpu-lane-results/); no set-up,
#                                        since nothing can be installed on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--gpu" ]]; then
    exec bash scripts/gpu_lane.sh "${2:-gpu-lane-results}"
fi
bash scripts/setup_env.sh
PY="${PYTHON:-python3}"
# The CMake build of csrc/ is part of the suite (about a minute on 2 cores).
export FASTPEFT_TEST_CMAKE="${FASTPEFT_TEST_CMAKE:-1}"
exec "$PY" -m pytest -q "$@"
