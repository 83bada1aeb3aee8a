"""AOT launches of ``fastpeft.kernels.adapter``: what the kernel report compiles for the adapter kernels.

See ``gates.aot_spec``.
"""
from __future__ import annotations

import torch

from fastpeft.kernels import _common
from fastpeft.kernels._common import dot_precision
from fastpeft.kernels.adapter import adapter_backward, adapter_forward, configs, dropout_mask

from ..aot_spec import launch_label, module_specs
from ..headline_shapes import distinct, gpu_shapes

KERNEL_MODULE = "fastpeft.kernels.adapter"


AOT_HIDDEN = (768, 4096)
AOT_BOTTLENECK = (48, 64, 256)
AOT_TOKENS = 512
AOT_LONG_TOKENS = 4096


def aot_launches() -> None:
    """Every launch variant of this module on benchmark-sized CPU tensors (recorded, never run).

    Per dtype, hidden size and bottleneck class: the inference forward (one
    token: split-K; 4096 tokens: fused), the training forward (pre stored,
    biases, residual, per-channel scale, dropout; 512 and 4096 tokens), the
    full backward with a 0-dim scale and dropout, and the
    backward of a frozen-x middle layer with a float scale; the training
    forward and full backward once per other activation (fp16, one shape). fp32 dots are exact
    ("ieee", FMA units), so only fp16/bf16 groups are marked as GEMMs.
    """
    for dtype in _common.KERNEL_DTYPES:
        name = _common.TRITON_DTYPE[dtype]
        is_gemm = _common.runs_on_tensor_cores(dtype, dot_precision(dtype))
        for h in AOT_HIDDEN:
            for b in AOT_BOTTLENECK:
                with launch_label(f"{name},H{h},{configs(b, dtype)[0].name}", is_gemm=is_gemm):
                    _aot_layer(h, b, dtype, "relu")
        with launch_label(f"{name},mask", is_gemm=False):
            dropout_mask((AOT_TOKENS, AOT_HIDDEN[0]), 0.1, 1, "cpu")
    for act in ("gelu", "gelu_new", "quick_gelu", "silu", "tanh", "sigmoid", "leakyrelu", "linear", "mish",
                "relu6"):
        with launch_label(f"fp16,{act}", is_gemm=True):
            _aot_layer(AOT_HIDDEN[0], 64, torch.float16, act, every_variant=False)
    _aot_headline_launches()


# The GPU benchmark's shapes (benchmarks/ops/adapter.py: bf16, Pfeiffer with reduction 16, a training step):
# launched again as headline launches, whose grids the kernel report's grid gate checks.
_HEADLINE = gpu_shapes("adapter", "default")
HEADLINE_HIDDEN = distinct(_HEADLINE, "H")
HEADLINE_TOKENS = distinct(_HEADLINE, "tokens")
_BOTTLENECK = dict(distinct(_HEADLINE, "H", "b"))


def _aot_headline_launches() -> None:
    dtype = torch.bfloat16
    for h in HEADLINE_HIDDEN:
        b = _BOTTLENECK[h]
        down_w, up_w, down_b, up_b = (torch.empty(shape, dtype=dtype) for shape in ((b, h), (h, b), (b,), (h,)))
        for m in HEADLINE_TOKENS:
            x, dy = torch.empty((m, h), dtype=dtype), torch.empty((m, h), dtype=dtype)
            with launch_label(f"bf16,H{h},m{m},{configs(b, dtype)[0].name}", is_gemm=True, headline=True):
                _, pre = adapter_forward(x, down_w, up_w, down_b, up_b, x, 1.0, None, "relu", 0.0, 0, True)
                adapter_backward(dy, x, down_w, up_w, up_b, pre, 1.0, torch.empty((), dtype=dtype), "relu", 0.0, 0,
                                 *[True] * 6)


def _aot_layer(h: int, b: int, dtype: torch.dtype, act: str, every_variant: bool = True) -> None:
    m = AOT_TOKENS

    def rand(*shape):
        return torch.empty(shape, dtype=dtype)

    x, dy, residual = rand(m, h), rand(m, h), rand(m, h)
    down_w, up_w, down_b, up_b, channel = rand(b, h), rand(h, b), rand(b), rand(h), rand(h)
    big_x = rand(AOT_LONG_TOKENS, h)  # enough rows for the fused forward without split-K
    _, pre = adapter_forward(x, down_w, up_w, down_b, up_b, residual, 1.0, channel, act, 0.1, 1, True)
    adapter_forward(x[:1], down_w, up_w, down_b, up_b, x[:1], 1.0, channel, act, 0.1, 1, True)  # few rows: split-K
    adapter_forward(big_x, down_w, up_w, down_b, up_b, big_x, 1.0, channel, act, 0.1, 1, True)
    adapter_backward(dy, x, down_w, up_w, up_b, pre, 1.0, rand(), act, 0.1, 1, *[True] * 6)
    if every_variant:
        for inference_x in (x[:1], big_x):  # one token (split-K) and many; with AdapterHub's biases and without
            for biases in ((down_b, up_b), (None, None)):
                adapter_forward(inference_x, down_w, up_w, *biases, inference_x, 2.0, None, act, 0.0, 0, False)
        adapter_backward(dy, x, down_w, up_w, None, pre, 4.0, None, act, 0.0, 0, False, True, True, True, True, False)


def aot_specs():
    return list(module_specs(KERNEL_MODULE))
