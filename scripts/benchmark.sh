#!/usr/bin/env bash
# Set-up plus the benchmark suite on the machine at hand (GPU if there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${PYTHON:-python3}" -m benchmarks "$@"
