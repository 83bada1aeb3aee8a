"""Optional test dependencies: present, they run; missing, the GPU lane skips with a reason.

The GPU machine has no bitsandbytes (and nothing can be installed there), so a
test module must never import it at module level: one missing package would
stop collection and the lane would run no test at all. ``optional_module``
imports it when it can; ``requires(name)`` marks the tests that cannot run
without it. On the CPU lane (CI) these packages are test dependencies: a
missing one is not skipped but fails the tests that use it, with the install
command in the message.
"""
from __future__ import annotations

import importlib
import os

import pytest

GPU_LANE = os.environ.get("FASTPEFT_TEST_GPU", "0") == "1"


class _Missing:
    """Stands for a module that is not installed; any use raises, naming the module."""

    def __init__(self, name: str, error: ImportError):
        self._name, self._error = name, error

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, attr):
        raise ModuleNotFoundError(f"{self._name} is a test dependency of the CPU lane (pip install -e .[test]): "
                                  f"{self._error}")


def optional_module(name: str):
    """The module ``name``, or a false stand-in whose every attribute raises ModuleNotFoundError."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        return _Missing(name, error)


def requires(name: str, why: str):
    """Marks a test that needs module ``name``: skipped (``why`` in the reason) only in the GPU lane, when missing."""
    missing = not optional_module(name)
    return pytest.mark.skipif(missing and GPU_LANE, reason=f"{name} is not installed here (optional on the GPU "
                                                           f"lane): {why}")


bitsandbytes_functional = optional_module("bitsandbytes.functional")
requires_bitsandbytes = requires("bitsandbytes", "bitsandbytes is the oracle of this test")
