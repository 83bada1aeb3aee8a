"""Which implementation runs an op: the Triton kernels or the CPU path.

Rule (docs/architecture.md, "Backends and dispatch"):
- CUDA tensors run the Triton (or CUDA C++) kernels.
- CPU tensors run the CPU path, unless ``TRITON_INTERPRET=1`` is set, in which
  case they run the real Triton kernels under the Triton interpreter.
- ``FASTPEFT_BACKEND`` forces one: ``triton``, ``cpu`` (the torch/C++ CPU path,
  also valid for CUDA tensors, where it runs the same torch code on the GPU),
  or ``auto`` (the default).

A forced or chosen Triton backend that fails raises; nothing here ever falls
back silently to another implementation.
"""
from __future__ import annotations

import enum
import functools
import os

import torch

ENV_BACKEND = "FASTPEFT_BACKEND"


class Backend(str, enum.Enum):
    TRITON = "triton"
    CPU = "cpu"


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels are executed by the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _forced_backend() -> Backend | None:
    value = os.environ.get(ENV_BACKEND, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Backend(value)
    except ValueError:
        raise ValueError(
            f"{ENV_BACKEND}={value!r} is not a backend; use one of 'auto', 'triton', 'cpu'"
        ) from None


def select_backend(device: torch.device) -> Backend:
    """The backend for tensors on ``device`` (see module docstring for the rule)."""
    forced = _forced_backend()
    if forced is Backend.TRITON:
        _require_triton(device)
        return Backend.TRITON
    if forced is Backend.CPU:
        return Backend.CPU
    if device.type == "cuda":
        _require_triton(device)
        return Backend.TRITON
    if device.type == "cpu" and triton_interpreter_enabled() and triton_available():
        return Backend.TRITON
    if device.type == "cpu":
        return Backend.CPU
    raise TypeError(f"fastpeft has no implementation for tensors on device {device}")


def _require_triton(device: torch.device) -> None:
    if not triton_available():
        raise RuntimeError("the Triton backend was selected but triton is not installed")
    if device.type == "cpu" and not triton_interpreter_enabled():
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
        )
    if device.type not in ("cpu", "cuda"):
        raise TypeError(f"the Triton backend cannot run on device {device}")
