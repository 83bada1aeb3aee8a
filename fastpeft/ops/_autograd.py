"""Named inputs and gradients for the ops' ``torch.autograd.Function`` classes.

Each Function lists its ``forward`` arguments once, in a module-level tuple
``<OP>_INPUTS`` (torch.compile cannot read a Function's class attributes);
backward asks ``needs(ctx, <OP>_INPUTS)`` which of them need a gradient and
returns ``gradients(<OP>_INPUTS, x=dx, ...)``: no positional bookkeeping to
keep in step with the signature.
"""
from __future__ import annotations


def needs(ctx, inputs: tuple[str, ...]) -> dict[str, bool]:
    """``{input name: needs a gradient}`` for the Function whose ``forward`` takes ``inputs``."""
    return dict(zip(inputs, ctx.needs_input_grad))


def gradients(inputs: tuple[str, ...], **grads) -> tuple:
    """The tuple ``backward`` returns: ``grads[name]`` for each input, None for the others."""
    unknown = set(grads) - set(inputs)
    assert not unknown, f"gradients for inputs that do not exist: {sorted(unknown)}"
    return tuple(grads.get(name) for name in inputs)
