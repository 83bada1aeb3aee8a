"""Argument checks shared by the ops: clear errors that name the argument.

The ``check_*`` functions raise a ValueError/TypeError naming the argument.
Ops run them on every call, so the common case must be cheap: the
``*_ok`` predicates test the same conditions in one expression and return a
bool, and an op runs the ``check_*`` functions (which raise with the message)
only when a predicate says False. Each predicate returns True only if every
check it stands for would pass; the tests hold them to that.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported, "
                        "call .to_dense() first")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of: {allowed}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(
                f"{name} is on {t.device} but {reference_name} is on {reference.device}; "
                "all tensors of one call must share a device"
            )


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; "
                "cast them to one dtype"
            )


def check_device(name: str, device) -> torch.device:
    """``device`` (a ``torch.device``, a string such as ``"cuda:0"`` or an index) as a ``torch.device``;
    a ValueError/TypeError naming ``name`` for anything torch cannot parse."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a str or an int, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name} {device!r} is not a device torch knows (e.g. 'cpu', 'cuda', 'cuda:1')") from err


def check_dim(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: {what} is {actual}, expected {expected}")


def check_positive_int(name: str, value) -> int:
    """``value`` if it is a positive int (bool excluded); TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_probability(name: str, p) -> float:
    """``p`` as a float in [0, 1) (a dropout probability); TypeError/ValueError naming ``name`` otherwise."""
    if type(p) is float and 0.0 <= p < 1.0:
        return p
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def check_lora_adapter(x: torch.Tensor, lora_A, lora_B, bias, out_features: int, in_features: int) -> None:
    """Checks of the LoRA pair (and bias) that every LoRA-carrying op shares.

    ``x`` is already checked; ``lora_A [r, K]``, ``lora_B [N, r]`` and ``bias [N]``
    must match it in device and dtype, and ``r`` must be positive.
    """
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    check_same_device("x", x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    check_same_dtype("x", x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"lora_A has rank r={r}; r must be positive")
    check_dim("x", x.shape[-1], in_features, "last dimension (in_features)")
    check_dim("lora_A", lora_A.shape[1], in_features, "dim 1 (in_features)")
    check_dim("lora_B", lora_B.shape[0], out_features, "dim 0 (out_features)")
    check_dim("lora_B", lora_B.shape[1], r, "dim 1 (rank r, from lora_A)")
    if bias is not None:
        check_dim("bias", bias.shape[0], out_features, "length (out_features)")


def check_scaling(name: str, scaling) -> float:
    """A finite real number (int or float, not bool or str) as float.

    Under ``torch.compile`` the value may be a symbolic float (``dynamic=True``,
    or automatic dynamic after a recompile), on which ``math.isfinite`` cannot
    trace: the finiteness check becomes a runtime assertion of the graph.
    """
    if torch.compiler.is_compiling():
        torch._check(abs(scaling) < math.inf, lambda: f"{name} must be finite")
        return scaling
    if type(scaling) is float and math.isfinite(scaling):
        return scaling
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        if isinstance(scaling, torch.Tensor) and scaling.numel() == 1 and not scaling.requires_grad \
                and not scaling.is_complex():
            scaling = scaling.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(scaling).__name__}")
    scaling = float(scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"{name} must be finite, got {scaling}")
    return scaling


_STRIDED = torch.strided


def lora_adapter_ok(x: Tensor, lora_A, lora_B, bias, out_features: int, in_features: int) -> bool:
    """True when ``check_lora_adapter`` and x's own checks pass (see the module docstring).

    x's checks: a dense (strided) tensor of a ``FLOAT_DTYPES`` dtype with at
    least one dimension; the caller adds those of its base weight.
    """
    try:
        dtype, device = x.dtype, x.device
        r, k = lora_A.shape  # a ValueError unless 2-D
        n, r_b = lora_B.shape
        if not (isinstance(x, Tensor) and isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor)
                and x.layout is _STRIDED and lora_A.layout is _STRIDED and lora_B.layout is _STRIDED
                and dtype in FLOAT_DTYPES and x.shape[-1] == in_features and k == in_features
                and n == out_features and r_b == r and r > 0
                and lora_A.dtype is dtype and lora_B.dtype is dtype
                and lora_A.device == device and lora_B.device == device):
            return False
        return bias is None or (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == out_features
                                and bias.dtype is dtype and bias.device == device)
    except (AttributeError, TypeError, ValueError, IndexError):  # not a tensor, wrong rank, 0-dim x
        return False
