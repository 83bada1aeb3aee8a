#!/usr/bin/env bash
# Installs fastpeft (editable) and everything its tests and benchmarks need into
# the current Python. torch is pinned to the 2.14.1 build first so that nothing
# later resolves a second torch; the package is installed without build
# isolation for the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
