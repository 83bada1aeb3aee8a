"""Test set-up: the CPU lane runs the Triton kernels under the interpreter; the GPU lane runs them compiled.

CPU lane (default, CI): ``TRITON_INTERPRET`` must be set before triton is
imported anywhere, so it is set here, at conftest import time, before any test
module imports fastpeft.

GPU lane (``FASTPEFT_TEST_GPU=1``, what ``bash scripts/test.sh --gpu`` sets):
no interpreter, and tensors the tests create land on the GPU
(``torch.set_default_device("cuda")``), so the same tests run the compiled
kernels, bf16 included. It refuses to start without a CUDA device, except in
the lane's dry run (``FASTPEFT_LANE_DRY_RUN=1``, ``scripts/gpu_lane.sh
--dry-run``: collection only, on a machine without a GPU), which takes the GPU
lane's path up to its first CUDA call and no further.
"""
import os
import sys

GPU_LANE = os.environ.get("FASTPEFT_TEST_GPU", "0") == "1"
if GPU_LANE:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("FASTPEFT_TEST_GPU=1 runs compiled kernels: unset TRITON_INTERPRET")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Shared test helpers (numerics.py, models.py) live in tests/; test files in
# sub-folders import them by plain name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

LANE_DRY_RUN = GPU_LANE and os.environ.get("FASTPEFT_LANE_DRY_RUN", "0") == "1"
if GPU_LANE and not LANE_DRY_RUN:
    if not torch.cuda.is_available():
        raise RuntimeError("FASTPEFT_TEST_GPU=1 but torch sees no CUDA device")
    torch.set_default_device("cuda")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def backend(request, monkeypatch):
    """Parametrize with indirect=True over "cpu" / "triton" to force a backend."""
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param
