"""Named inputs and gradients for the ops' ``torch.autograd.Function`` classes.

Each Function lists its ``forward`` arguments once, in a module-level tuple
``<OP>_INPUTS`` (torch.compile cannot read a Function's class attributes);
backward asks ``needs(ctx, <OP>_INPUTS)`` which of them need a gradient and
returns ``gradients(<OP>_INPUTS, x=dx, ...)``: no positional bookkeeping to
keep in step with the signature.

``once_differentiable`` is torch's decorator of the same name without its
per-call cost in the common case (see its docstring).
"""
from __future__ import annotations

import functools

import torch
from torch.autograd import forward_ad as _forward_ad
from torch.autograd.function import once_differentiable as _torch_once_differentiable


def needs(ctx, inputs: tuple[str, ...]) -> dict[str, bool]:
    """``{input name: needs a gradient}`` for the Function whose ``forward`` takes ``inputs``."""
    return dict(zip(inputs, ctx.needs_input_grad))


def gradients(inputs: tuple[str, ...], **grads) -> tuple:
    """The tuple ``backward`` returns: ``grads[name]`` for each input, None for the others."""
    result = tuple([grads.pop(name, None) for name in inputs])
    assert not grads, f"gradients for inputs that do not exist: {sorted(grads)}"
    return result


def once_differentiable(backward):
    """``torch.autograd.function.once_differentiable`` for a Function's ``backward``, minus its cost.

    Torch's wrapper runs ``backward`` under ``no_grad`` and, when grad mode is
    on (a ``create_graph=True`` backward), marks the results so that a second
    differentiation raises. A plain backward already runs with grad mode off,
    where the wrapper has nothing to do but costs a ``no_grad`` context per
    call: this one calls ``backward`` directly then and torch's wrapper otherwise.

    Torch's marker hangs off the incoming gradients only, so a second
    differentiation with respect to the op's own inputs (``allow_unused=True``,
    ``torch.autograd.functional.hvp``) would find no path and return None or
    zeros, a silent wrong answer. Each gradient is therefore also tied to the
    saved tensors and incoming gradients that require grad, through a node
    that raises.
    """
    guarded = _torch_once_differentiable(backward)
    is_grad_enabled = torch.is_grad_enabled

    @functools.wraps(backward)
    def run(ctx, *grad_outputs):
        if is_grad_enabled():
            inputs = [t for t in (*ctx.saved_tensors, *grad_outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = guarded(ctx, *grad_outputs)
            if not inputs:
                return grads
            single = not isinstance(grads, tuple)
            tied = tuple(g if g is None else _NotTwiceDifferentiable.apply(g, *inputs)
                         for g in ((grads,) if single else grads))
            return tied[0] if single else tied
        return backward(ctx, *grad_outputs)

    return run


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Identity on a gradient, connected to the op's inputs; differentiating through it raises."""

    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise RuntimeError("trying to differentiate twice a function that was marked with @once_differentiable: "
                           "this fastpeft op has no second derivatives (LoRA and QLoRA do)")


def forward_ad_active() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()`` (dual tensors may be about)."""
    return _forward_ad._current_level >= 0
