"""Helpers the op files share: availability checks, inputs, the compiled provider."""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from ..suite.spec import FORWARD, FORWARD_BACKWARD, Case, requires_grad_in

N_ROTATE = 4  # input buffers the harness cycles through


def missing_import(*modules: str, attr: Optional[tuple] = None) -> Callable[[], Optional[str]]:
    """An ``unavailable()`` that reports the first module (or ``(module, name)``) that fails to import."""

    def check() -> Optional[str]:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:
                return f"import {name} failed: {type(exc).__name__}: {exc}"
        if attr is not None:
            module, name = attr
            try:
                found = hasattr(importlib.import_module(module), name)
            except Exception as exc:
                return f"import {module} failed: {type(exc).__name__}: {exc}"
            if not found:
                return f"{module}.{name} does not exist (yet)"
        return None

    return check


def rotating_inputs(m: int, k: int, device, dtype, mode: str, n: int = N_ROTATE) -> list:
    """``n`` fresh random ``[m, k]`` inputs; they need grad in the backward modes."""
    return [torch.randn(m, k, device=device, dtype=dtype).requires_grad_(requires_grad_in(mode)) for _ in range(n)]


def upstream_grad(m: int, n: int, device, dtype, mode: str):
    return torch.randn(m, n, device=device, dtype=dtype) if requires_grad_in(mode) else None


def trainable(t: torch.Tensor, mode: str) -> torch.Tensor:
    return t.requires_grad_(requires_grad_in(mode))


_COMPILED: dict = {}
# A suite recompiles one function for every input dtype, grad mode and size-1 dim it meets; past dynamo's
# default limit (8 per function) it would silently run the function eagerly and time that as "compile".
RECOMPILE_LIMIT = 64


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=True)``, built once per process and function.

    One compiled callable serves every shape, as in a real model; recompiles
    (dtype, grad vs no grad, size-1 dims) happen in the untimed first call that
    the runner makes while building each case, within ``RECOMPILE_LIMIT``.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def both_precisions_on_cpu(device_type: str, level: str) -> tuple:
    """``OpBench.dtypes`` of the ops a user runs in float32 or bfloat16 on a CPU: both, so that each
    peer is compared with fastpeft at the precision it computes in; bfloat16 on a GPU."""
    return ("float32", "bfloat16") if device_type == "cpu" else ("bfloat16",)


def case_tensors(case: Case, *names: str):
    return tuple(case.tensors[n] for n in names)


def lora_layer_work(shape: dict, mode: str, provider: str, dtype, weight_bytes: int) -> tuple:
    """Ideal (flops, bytes) of a LoRA layer over a frozen base whose weight is ``weight_bytes`` bytes.

    Every tensor is read or written once per pass; the ``base`` provider has no
    LoRA term. Backward: ``dx = dy W (+ dh A)``, ``dh = s dy B``, ``dA = dhᵀ x``,
    ``dB = dyᵀ h``.
    """
    m, k, n, r = shape["tokens"], shape["K"], shape["N"], shape["r"]
    e = torch.empty((), dtype=dtype).element_size()
    lora = provider != "base"
    fwd_flops = 2 * m * n * k + (2 * m * r * (k + n) if lora else 0)
    fwd_bytes = weight_bytes + e * (m * k + m * n + (r * (k + n) if lora else 0))
    bwd_flops = 2 * m * n * k + (4 * m * r * (k + n) if lora else 0)
    bwd_bytes = weight_bytes + e * (m * n + m * k + (m * k + 2 * r * (k + n) if lora else 0))
    if mode == FORWARD:
        return fwd_flops, fwd_bytes
    if mode == FORWARD_BACKWARD:
        return fwd_flops + bwd_flops, fwd_bytes + bwd_bytes
    return bwd_flops, bwd_bytes
