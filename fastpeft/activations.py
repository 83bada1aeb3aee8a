"""The activations a bottleneck adapter can use: one table, names as transformers' ``ACT2FN`` spells them.

Each entry has a numeric id (the ``ACT`` constexpr the Triton kernels switch
on, see ``fastpeft.kernels._adapter_kernels.activate``), a torch forward that
may work in place on a temporary, and the derivative as a function of the
pre-activation, which the CPU backward multiplies into ``dz``. AdapterHub
lower-cases the name and special-cases ``"leakyrelu"`` (``F.leaky_relu``,
slope 0.01); ``"identity"`` is accepted as a synonym of ``"linear"``.

The tanh-form GELUs (``gelu_new``, ``gelu_fast``, ``gelu_pytorch_tanh``,
``gelu_python_tanh``) are one function; transformers computes them with
different rounding only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RELU, GELU, GELU_TANH, QUICK_GELU, SILU, TANH, SIGMOID, LEAKY_RELU, IDENTITY, MISH, RELU6 = range(11)
LEAKY_SLOPE = 0.01
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_CUBIC = 0.044715
_QUICK = 1.702


@dataclass(frozen=True)
class Activation:
    """``forward_(t)`` may overwrite ``t`` (a temporary), returns ``act(t)``; ``derivative(pre)`` is ``act'(pre)``."""

    id: int
    forward_: Callable[[Tensor], Tensor]
    derivative: Callable[[Tensor], Tensor]


def _gelu_tanh_inner(x: Tensor) -> Tensor:
    return torch.tanh(_SQRT_2_OVER_PI * (x + _TANH_CUBIC * x * x * x))


def _gelu_tanh_grad(x: Tensor) -> Tensor:
    t = _gelu_tanh_inner(x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * x * x)


def _gelu_grad(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _quick_gelu_grad(x: Tensor) -> Tensor:
    s = torch.sigmoid(_QUICK * x)
    return s + _QUICK * x * s * (1.0 - s)


def _silu_grad(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _mish_grad(x: Tensor) -> Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * (1.0 - t * t) * torch.sigmoid(x)


def _sigmoid_grad(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _tanh_grad(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return 1.0 - t * t


# Derivatives as torch's backward gives them: relu passes the gradient at NaN (threshold_backward), relu6
# does not (torch.clamp's, and relu6's own vectorized backward), leaky relu's slope in x's dtype (fp64 for
# fp64, not 0.01 rounded to fp32).
_RELU = Activation(RELU, torch.relu_, lambda x: (x <= 0).logical_not_().to(x.dtype))
_GELU = Activation(GELU, F.gelu, _gelu_grad)
_GELU_TANH = Activation(GELU_TANH, lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_grad)
_LEAKY = Activation(LEAKY_RELU, lambda x: F.leaky_relu_(x, LEAKY_SLOPE),
                    lambda x: torch.where(x > 0, x.new_ones(()), x.new_full((), LEAKY_SLOPE)))

ACTIVATIONS: dict[str, Activation] = {
    "relu": _RELU,
    "gelu": _GELU,
    "gelu_python": _GELU,
    "gelu_new": _GELU_TANH,
    "gelu_fast": _GELU_TANH,
    "gelu_pytorch_tanh": _GELU_TANH,
    "gelu_python_tanh": _GELU_TANH,
    "quick_gelu": Activation(QUICK_GELU, lambda x: x * torch.sigmoid(_QUICK * x), _quick_gelu_grad),
    "silu": Activation(SILU, F.silu, _silu_grad),
    "swish": Activation(SILU, F.silu, _silu_grad),
    "tanh": Activation(TANH, torch.tanh_, _tanh_grad),
    "sigmoid": Activation(SIGMOID, torch.sigmoid_, _sigmoid_grad),
    "leakyrelu": _LEAKY,
    "leaky_relu": _LEAKY,
    "mish": Activation(MISH, F.mish, _mish_grad),
    "relu6": Activation(RELU6, lambda x: x.clamp_(0.0, 6.0), lambda x: ((x > 0) & (x < 6)).to(x.dtype)),
    "linear": Activation(IDENTITY, lambda x: x, torch.ones_like),
    "identity": Activation(IDENTITY, lambda x: x, torch.ones_like),
}


def activation(name) -> Activation:
    """The table entry of ``name`` (case-insensitive, as AdapterHub); ValueError naming the accepted names."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str, got {type(name).__name__}")
    found = ACTIVATIONS.get(name.lower())
    if found is None:
        raise ValueError(f"activation {name!r} is not supported; accepted: {', '.join(sorted(ACTIVATIONS))}")
    return found


def activation_id(name: str) -> int:
    """The ``ACT`` constexpr of ``name`` for the Triton kernels."""
    return activation(name).id
