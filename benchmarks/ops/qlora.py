"""QLoRA linear ``y = x · dequant_nf4(W)ᵀ + s · (x Aᵀ) Bᵀ``: a QLoRA training layer.

Providers: the frozen NF4 base alone (fastpeft ``nf4_linear``, the overhead
baseline), fastpeft ``qlora_linear``, HF PEFT's LoRA over a bitsandbytes
``Linear4bit`` (what a QLoRA user runs today), and unfused torch (dequantize,
matmul, LoRA). All quantized providers hold the same NF4 codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..suite.spec import FORWARD, Built, Case, OpBench, Provider
from .common import (both_precisions_on_cpu, case_tensors, lora_layer_work, missing_import, rotating_inputs,
                     trainable, upstream_grad)
from .nf4 import BLOCKSIZE, bnb_kernel_note, bnb_linear4bit, nf4_weight

SCALING = 2.0


def _shapes(device_type: str, level: str) -> list:
    def grid(kn_pairs, ranks, tokens):
        return [dict(tokens=m, K=k, N=n, r=r) for k, n in kn_pairs for r in ranks for m in tokens]

    if device_type == "cuda":
        if level == "quick":
            return grid([(4096, 4096)], [16], [1, 4096])
        ranks = [8, 16, 64] if level == "full" else [16]
        return grid([(4096, 4096), (4096, 14336)], ranks, [1, 16, 512, 4096])
    if level == "quick":
        return grid([(256, 256)], [16], [1, 16])
    if level == "full":
        return grid([(2048, 2048), (4096, 4096)], [16, 64], [1, 16, 256])
    return grid([(2048, 2048)], [16], [1, 64])


def _make_case(shape: dict, device, dtype, mode: str) -> Case:
    m, k, n, r = shape["tokens"], shape["K"], shape["N"], shape["r"]
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    lora_A = trainable(torch.randn(r, k, device=device, dtype=dtype) / k**0.5, mode)
    lora_B = trainable(torch.randn(n, r, device=device, dtype=dtype) / r**0.5, mode)
    return Case(shape, device, dtype, mode, rotating_inputs(m, k, device, dtype, mode),
                upstream_grad(m, n, device, dtype, mode), dict(weight=weight, lora_A=lora_A, lora_B=lora_B))


def _base(case: Case) -> Built:
    from fastpeft.ops.nf4 import nf4_linear

    w = nf4_weight(case)
    return Built(lambda x: nf4_linear(x, w))


def _fastpeft(case: Case) -> Built:
    from fastpeft.ops.qlora import qlora_linear

    w = nf4_weight(case)
    lora_A, lora_B = case_tensors(case, "lora_A", "lora_B")
    return Built(lambda x: qlora_linear(x, w, lora_A, lora_B, SCALING), [lora_A, lora_B])


def _torch(case: Case) -> Built:
    w = nf4_weight(case)
    lora_A, lora_B = case_tensors(case, "lora_A", "lora_B")

    def fn(x):
        return F.linear(x, w.dequantize(x.dtype)) + SCALING * F.linear(F.linear(x, lora_A), lora_B)

    return Built(fn, [lora_A, lora_B])


def _peft_bnb(case: Case) -> Built:
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    weight, lora_A, lora_B = case_tensors(case, "weight", "lora_A", "lora_B")
    r = lora_A.shape[0]
    base = bnb_linear4bit(weight, case.dtype, case.device)
    alpha = SCALING * r
    layer = PeftLinear4bit(base, "default", config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0),
                           r=r, lora_alpha=alpha, lora_dropout=0.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.data = lora_A.detach().clone()
        b.data = lora_B.detach().clone()
    layer.train(case.mode != FORWARD)
    return Built(layer, [a, b], note=bnb_kernel_note(case.device))


def _work(shape: dict, mode: str, provider: str, dtype) -> tuple:
    """Ideal (flops, bytes) with the packed NF4 weight (4 bits + an fp32 scale per block) as the base."""
    n, k = shape["N"], shape["K"]
    return lora_layer_work(shape, mode, provider, dtype, n * k // 2 + 4 * (n * k // BLOCKSIZE))


OP = OpBench(
    name="qlora",
    title="QLoRA linear (NF4 base + LoRA)",
    providers=[
        Provider("base", _base, missing_import(attr=("fastpeft.ops.nf4", "nf4_linear")), ours=True),
        Provider("fastpeft", _fastpeft, missing_import(attr=("fastpeft.ops.qlora", "qlora_linear")), ours=True),
        Provider("peft+bnb", _peft_bnb, missing_import("peft", "bitsandbytes")),
        Provider("torch", _torch, missing_import("fastpeft.quant.nf4")),
    ],
    shapes=_shapes,
    make_case=_make_case,
    work=_work,
    baseline="base",
    reference="torch",
    dtypes=both_precisions_on_cpu,
    headline=("base", "fastpeft", "peft+bnb"),
)
