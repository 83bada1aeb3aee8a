"""Every tensor argument of every op may be a strided view with a storage offset (issue 19 item 1).

Each op runs twice on the same values: once on contiguous tensors, once with
one argument (and then all of them) replaced by a view into a NaN-filled
buffer with every stride doubled (the last one too) and a storage offset of 3.
A kernel that reads the view as if it were contiguous, or from its base
pointer, reads other values or the NaN padding, and the output or a gradient
differs. Both backends (the CPU path, the Triton kernels under the interpreter).
"""
import pytest
import torch

from fastpeft.ops import bottleneck_adapter, dora_linear, lora_linear, nf4_linear, prefix_attention, qlora_linear
from fastpeft.quant import NF4Weight
from lane_device import lane_generator

OFFSET = 3


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a view with doubled strides and storage offset ``OFFSET`` (padding: NaN or False)."""
    strides, step = [], 2
    for size in reversed(t.shape):
        strides.insert(0, step)
        step *= 2 * max(size, 1)
    fill = False if t.dtype == torch.bool else float("nan")
    buf = torch.full((OFFSET + step,), fill, dtype=t.dtype)
    view = buf.as_strided(t.shape, strides, OFFSET)
    view.copy_(t)
    assert not view.is_contiguous() and view.storage_offset() == OFFSET
    return view


def _adapter(x, down_weight, up_weight, down_bias, up_bias, residual, scale):
    return bottleneck_adapter(x, down_weight, up_weight, down_bias, up_bias, residual, scaling=scale,
                              activation="gelu")


def _lora(x, weight, bias, lora_A, lora_B):
    return lora_linear(x, weight, lora_A, lora_B, 1.5, bias=bias)


def _dora(x, weight, bias, lora_A, lora_B, magnitude):
    return dora_linear(x, weight, lora_A, lora_B, magnitude, 1.5, bias=bias)


_NF4 = {}


def _nf4_weight():
    if not _NF4:
        _NF4["w"] = NF4Weight.from_float(torch.randn(24, 64, generator=lane_generator(1)) * 0.1,
                                         blocksize=64)
    return _NF4["w"]


def _nf4(x, bias):
    return nf4_linear(x, _nf4_weight(), bias)


def _qlora(x, bias, lora_A, lora_B):
    return qlora_linear(x, _nf4_weight(), lora_A, lora_B, 1.5, bias=bias)


def _prefix(q, k, v, prefix_k, prefix_v, key_padding_mask):
    return prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, causal=True)


def _mask(b, s):
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, :2] = False
    return mask


OPS = {
    "adapter": (_adapter, lambda: dict(x=torch.randn(2, 3, 20), down_weight=torch.randn(6, 20) * 0.3,
                                       up_weight=torch.randn(20, 6) * 0.3, down_bias=torch.randn(6),
                                       up_bias=torch.randn(20), residual=torch.randn(2, 3, 20),
                                       scale=torch.rand(20) + 0.5)),
    "lora": (_lora, lambda: dict(x=torch.randn(2, 3, 20), weight=torch.randn(12, 20), bias=torch.randn(12),
                                 lora_A=torch.randn(4, 20), lora_B=torch.randn(12, 4))),
    "dora": (_dora, lambda: dict(x=torch.randn(2, 3, 20), weight=torch.randn(12, 20), bias=torch.randn(12),
                                 lora_A=torch.randn(4, 20), lora_B=torch.randn(12, 4),
                                 magnitude=torch.rand(12) + 0.5)),
    "nf4": (_nf4, lambda: dict(x=torch.randn(5, 64), bias=torch.randn(24))),
    "qlora": (_qlora, lambda: dict(x=torch.randn(5, 64), bias=torch.randn(24), lora_A=torch.randn(4, 64),
                                   lora_B=torch.randn(24, 4))),
    "prefix_attention": (_prefix, lambda: dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 7, 8),
                                               v=torch.randn(2, 2, 7, 8), prefix_k=torch.randn(1, 2, 3, 8),
                                               prefix_v=torch.randn(1, 2, 3, 8), key_padding_mask=_mask(2, 7))),
}
CASES = [(op, arg) for op, (_, make) in OPS.items() for arg in list(make()) + ["all"]]


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("op, arg", CASES)
def test_strided_argument_gives_the_contiguous_result(op, arg, backend):
    fn, make = OPS[op]
    values = make()

    def run(strided_names):
        leaves = {n: (strided_copy(t) if n in strided_names else t.clone()).detach() for n, t in values.items()}
        for t in leaves.values():
            if t.is_floating_point():
                t.requires_grad_()
        out = fn(**leaves)
        out.backward(torch.ones_like(out) + torch.arange(out.numel()).view(out.shape) % 3)
        return out.detach(), {n: t.grad for n, t in leaves.items() if t.is_floating_point()}

    want, want_grads = run(())
    got, got_grads = run(set(values) if arg == "all" else {arg})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg="out")
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-5, atol=1e-5, msg=f"d{n}")
