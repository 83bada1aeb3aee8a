"""How every op reaches its implementation: one dispatch contract, one eager fast path.

Dispatch contract (``docs/architecture.md``, "Ops"): an op ``<op>`` has a
Triton module ``fastpeft.kernels.<op>`` and a CPU module
``fastpeft.ops.<op>_cpu`` that export the same plain functions (e.g.
``<op>_forward`` / ``<op>_backward``) with the same arguments and results.
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
from types import ModuleType

import torch

from .._backend import Backend, select_backend


@functools.lru_cache(maxsize=None)
def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


def implementation(op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """``fastpeft.kernels.<op>`` or ``fastpeft.ops.<op>_cpu``, by the backend rule for ``device``.

    Raises TypeError when the Triton backend is selected for a dtype its kernels do not take.
    """
    if select_backend(device) is Backend.TRITON:
        kernels = _module(f"fastpeft.kernels.{op}")
        kernels.check_kernel_dtype(op, dtype)
        return kernels
    return _module(f"fastpeft.ops.{op}_cpu")


def custom_op_with_eager_path(name: str, implementation):
    """Registers ``implementation`` as the custom op ``name``; returns ``(op, call)``.

    ``call(*args)`` runs ``implementation`` directly in eager mode and the
    custom op while torch.compile traces. Register the fake implementation on
    ``op``.
    """
    op = torch.library.custom_op(name, mutates_args=())(implementation)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return implementation(*args)

    return op, call


def not_computed(grads, like: torch.Tensor) -> tuple:
    """Custom ops cannot return None: an empty tensor stands for "not computed"."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)
