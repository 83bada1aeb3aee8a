"""NF4 linear ``y = x · dequant_nf4(W)ᵀ``: the frozen 4-bit base layer of QLoRA.

Providers: fastpeft ``nf4_linear``; the dense ``F.linear`` in the input dtype
(fp32 and bf16 on CPU, bf16 on GPU) as the speed baseline; bitsandbytes ``Linear4bit``;
and "dequantize, then matmul" in plain torch. Every quantized provider holds
the same codes (blocksize 64, no double quantization). Forward only: a frozen
base layer in inference or in the forward of a QLoRA step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..suite.spec import FORWARD, Built, Case, OpBench, Provider
from .common import both_precisions_on_cpu, case_tensors, missing_import, rotating_inputs, upstream_grad

BLOCKSIZE = 64


def _shapes(device_type: str, level: str) -> list:
    def grid(kn_pairs, tokens):
        return [dict(tokens=m, K=k, N=n) for k, n in kn_pairs for m in tokens]

    if device_type == "cuda":
        if level == "quick":
            return grid([(4096, 4096)], [1, 512])
        pairs = [(4096, 4096), (4096, 14336), (14336, 4096)]
        tokens = [1, 16, 512, 4096] if level == "full" else [1, 16, 512]
        return grid(pairs, tokens)
    if level == "quick":
        return grid([(256, 256)], [1, 16])
    return grid([(4096, 4096)], [1, 16, 256] if level == "full" else [1, 256])


def _make_case(shape: dict, device, dtype, mode: str) -> Case:
    m, k, n = shape["tokens"], shape["K"], shape["N"]
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    return Case(shape, device, dtype, mode, rotating_inputs(m, k, device, dtype, mode),
                upstream_grad(m, n, device, dtype, mode), dict(weight=weight))


def nf4_weight(case: Case):
    """The NF4 form of the case's weight, made once and shared by the providers that read it."""
    if "nf4" not in case.tensors:
        from fastpeft.quant.nf4 import NF4Weight

        case.tensors["nf4"] = NF4Weight.from_float(case.tensors["weight"], blocksize=BLOCKSIZE, double_quant=False)
    return case.tensors["nf4"]


def _dense(case: Case) -> Built:
    (weight,) = case_tensors(case, "weight")
    return Built(lambda x: F.linear(x, weight))


def _fastpeft(case: Case) -> Built:
    from fastpeft.ops.nf4 import nf4_linear

    w = nf4_weight(case)
    return Built(lambda x: nf4_linear(x, w))


def _dequant_matmul(case: Case) -> Built:
    w = nf4_weight(case)
    return Built(lambda x: F.linear(x, w.dequantize(x.dtype)))


def bnb_linear4bit(weight, dtype, device):
    """A bitsandbytes ``Linear4bit`` (NF4, blocksize 64, no double quant) holding ``weight``."""
    import bitsandbytes as bnb

    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=False,
                              quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit(weight.detach().float().cpu(), requires_grad=False, quant_type="nf4",
                                     blocksize=BLOCKSIZE, compress_statistics=False)
    return layer.to(device)  # quantizes on the way


def bnb_kernel_note(device) -> str:
    """Which CPU kernel bitsandbytes runs here, for the row's note ("" on a GPU).

    With AVX512-BF16, bitsandbytes prefers a kernel it downloads from the Hugging Face hub at import
    (``kernels-community/quantization-bitsandbytes``, through the optional ``kernels`` package) and falls
    back to the kernel it ships. The suite installs no ``kernels`` and downloads nothing, so it says which ran.
    """
    if torch.device(device).type != "cpu":
        return ""
    try:
        from bitsandbytes.backends.cpu import ops as bnb_cpu_ops
    except ImportError:
        return ""
    if not hasattr(bnb_cpu_ops, "gemm_4bit_forward_kernel"):
        return "bitsandbytes dequantizes, then multiplies (no fused CPU kernel without AVX512-BF16)"
    if bnb_cpu_ops.gemm_4bit_forward_kernel is None:
        return "the CPU kernel bitsandbytes ships (its optional hub-downloaded kernel is not installed)"
    return "the hub-downloaded kernels-community CPU kernel of bitsandbytes"


def _bitsandbytes(case: Case) -> Built:
    return Built(bnb_linear4bit(case.tensors["weight"], case.dtype, case.device), note=bnb_kernel_note(case.device))


def _work(shape: dict, mode: str, provider: str, dtype) -> tuple:
    """(flops, bytes) of one forward: the weight is read once, packed or dense."""
    m, k, n = shape["tokens"], shape["K"], shape["N"]
    e = torch.empty((), dtype=dtype).element_size()
    if provider == "dense":
        weight_bytes = n * k * e
    else:
        weight_bytes = n * k // 2 + 4 * (n * k // BLOCKSIZE)  # 4-bit codes + fp32 absmax
    return 2 * m * n * k, weight_bytes + e * (m * k + m * n)


OP = OpBench(
    name="nf4",
    title="NF4 linear (QLoRA base layer)",
    providers=[
        Provider("dense", _dense),
        Provider("fastpeft", _fastpeft, missing_import("fastpeft.quant.nf4", attr=("fastpeft.ops.nf4", "nf4_linear")),
                 ours=True),
        Provider("bitsandbytes", _bitsandbytes, missing_import("bitsandbytes")),
        Provider("torch", _dequant_matmul, missing_import("fastpeft.quant.nf4")),
    ],
    shapes=_shapes,
    make_case=_make_case,
    work=_work,
    modes=(FORWARD,),
    baseline="dense",
    reference="torch",
    dtypes=both_precisions_on_cpu,
    headline=("dense", "fastpeft", "bitsandbytes", "torch"),
)
