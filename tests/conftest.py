"""Test set-up: every test session runs the Triton kernels under the interpreter.

``TRITON_INTERPRET`` must be set before triton is imported anywhere, so it is
set here, at conftest import time, before any test module imports fastpeft.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# Shared test helpers (numerics.py, models.py) live in tests/; test files in
# sub-folders import them by plain name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def backend(request, monkeypatch):
    """Parametrize with indirect=True over "cpu" / "triton" to force a backend."""
    monkeypatch.setenv("FASTPEFT_BACKEND", request.param)
    return request.param
