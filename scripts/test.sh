#!/usr/bin/env bash
# Set-up plus the whole test suite (Triton kernels under the interpreter, CPU
# paths, the native extension, the ahead-of-time kernel report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The CMake build of csrc/ is part of the suite (about a minute on 2 cores).
export FASTPEFT_TEST_CMAKE="${FASTPEFT_TEST_CMAKE:-1}"
exec "${PYTHON:-python3}" -m pytest -q "$@"
