"""How every op reaches its implementation: one dispatch contract, one eager fast path.

Dispatch contract (``docs/architecture.md``, "Backends and dispatch"): an op
``<op>`` has a Triton module ``fastpeft.kernels.<op>`` and a CPU module
``fastpeft.cpu.<op>`` that export the same plain functions with the same
arguments and results, declared once per op as a protocol in
``fastpeft.ops._contracts``.
``implementation(op, device, dtype)`` returns the module the backend rule of
``fastpeft._backend`` picks for tensors on ``device``; the op calls the
function it needs on it. Nothing falls back from one module to the other.

Custom ops: a ``torch.library.custom_op`` costs about 50 µs of Python
dispatch per call, a third of a whole LoRA layer at one token. It is only
needed where a tracer must treat the kernel as opaque (``torch.compile``,
``torch.export``), so eager code calls the same implementation directly
(``custom_op_with_eager_path``).
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from .._backend import ENV_BACKEND, Backend, select_backend

# The environment variables the backend rule reads (``fastpeft._backend``); part of each cached choice.
_BACKEND_ENV = (ENV_BACKEND, "TRITON_INTERPRET")
# os.environ's own dict (what ``os.environ[...] = ...`` and monkeypatch.setenv update): reading it costs a
# fifth of ``os.environ.get``, which decodes the key and raises KeyError inside for an unset variable.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = tuple(os.environ.encodekey(name) for name in _BACKEND_ENV) if _ENVIRON_DATA is not None else None
_CHOICES: dict = {}


@functools.lru_cache(maxsize=None)
def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


def _backend_environment() -> tuple:
    return tuple(os.environ.get(name) for name in _BACKEND_ENV)


def implementation(op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """``fastpeft.kernels.<op>`` or ``fastpeft.cpu.<op>``, by the backend rule for ``device``.

    Raises TypeError when the Triton backend is selected for a dtype its kernels do not take.
    The choice is cached per (op, device, dtype) and the backend environment variables, which are
    read on every call, so setting ``FASTPEFT_BACKEND`` takes effect at the next call; a choice
    that raises is never cached.
    """
    if _ENVIRON_DATA is None:
        key = (op, device, dtype, *_backend_environment())
    else:
        key = (op, device, dtype, _ENVIRON_DATA.get(_ENV_KEYS[0]), _ENVIRON_DATA.get(_ENV_KEYS[1]))
    module = _CHOICES.get(key)
    if module is None:
        module = _CHOICES[key] = _choose(op, device, dtype)
    return module


def _choose(op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    if select_backend(device) is Backend.TRITON:
        kernels = _module(f"fastpeft.kernels.{op}")
        kernels.check_kernel_dtype(op, dtype)
        return kernels
    return _module(f"fastpeft.cpu.{op}")


def custom_op_with_eager_path(name: str, implementation, eager=None):
    """Registers ``implementation`` as the custom op ``name``; returns ``(op, call)``.

    ``call(*args)`` runs the op while torch.compile traces, and in eager mode
    calls ``eager`` (default: ``implementation``) directly: the same
    computation without the custom-op dispatcher. An ``eager`` function may
    return None for outputs the op must return as tensors (``not_computed``).
    Register the fake implementation on ``op``.
    """
    op = torch.library.custom_op(name, mutates_args=())(implementation)
    eager = implementation if eager is None else eager
    is_compiling = torch.compiler.is_compiling

    def call(*args):
        if is_compiling():
            return op(*args)
        return eager(*args)

    return op, call


def not_computed(grads, like: torch.Tensor) -> tuple:
    """Custom ops cannot return None: an empty tensor stands for "not computed"."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)
