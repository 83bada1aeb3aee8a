"""``torch.autocast`` for the fastpeft ops: torch's casting rules for ``linear``, applied at the op entry.

Under ``torch.autocast(device_type, dtype)``, torch runs ``linear`` in the
autocast dtype: every floating input except float64 is cast to it (x, the
weight, the bias), the result has that dtype and gradients flow back through
the casts in each input's own dtype (fp32 master weights get fp32 grads).
The LoRA/NF4/QLoRA ops follow the same rule for all of their floating inputs
(x, weight, bias, ``lora_A``, ``lora_B``; an NF4 weight is dequantized to x's
dtype anyway).

Why an explicit cast at the entry rather than ``torch.amp.custom_fwd``:
``custom_fwd`` needs one ``device_type`` fixed when the Function is defined,
while these ops serve CPU and CUDA tensors from one Function; the cast at the
entry also happens before the argument checks, so the checks see the dtypes
the kernels will get. The Function then runs with autocast off (forward and
backward), so the kernels' own fp32 accumulators and saved fp32 tensors are
never recast by autocast behind their back.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

# True when autocast is on for any device type: one C call (torch.compile folds it to a constant), so the
# common case (no autocast) costs the ops nothing more.
any_autocast_enabled = torch._C._is_any_autocast_enabled


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype autocast runs ``linear`` in for ``x``; None when autocast is off for x's device or x is not cast."""
    if not any_autocast_enabled() or not isinstance(x, torch.Tensor) or not _eligible(x):
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None


def autocast_inputs(x, *others):
    """``(x, *others)`` cast as autocast casts ``linear``'s inputs; unchanged when autocast is off.

    Non-tensors and None pass through untouched (the op's checks report them).
    """
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *others)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and _eligible(t) else t for t in (x, *others))


def autocast_off(device_type: str):
    """A context in which autocast is disabled for ``device_type`` (a no-op when it is off already)."""
    try:
        if any_autocast_enabled() and torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        pass
    return contextlib.nullcontext()


def _eligible(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def outside_autocast(backward):
    """Decorates a Function's ``backward(ctx, dy, ...)``: a backward run inside an autocast region must not
    recast (the device is the first gradient's)."""
    @functools.wraps(backward)
    def run(ctx, dy, *more):
        if not any_autocast_enabled():
            return backward(ctx, dy, *more)
        with autocast_off(dy.device.type):
            return backward(ctx, dy, *more)

    return run
