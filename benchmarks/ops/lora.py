"""LoRA linear ``y = x Wᵀ + s · (x Aᵀ) Bᵀ``: fastpeft against the tools a user would otherwise use.

Providers: the frozen base ``F.linear`` alone (the overhead baseline),
fastpeft ``lora_linear``, HF PEFT ``lora.Linear`` over an ``nn.Linear``,
unfused torch, and ``torch.compile`` of the unfused function. In the backward
modes the base weight is frozen, A and B are trainable and x needs grad (a
middle layer of a model in training). No bias, as in Llama.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..suite.spec import FORWARD, Built, Case, OpBench, Provider
from .common import (both_precisions_on_cpu, case_tensors, compiled, lora_layer_work, missing_import,
                     rotating_inputs, trainable, upstream_grad)

SCALING = 2.0


def _shapes(device_type: str, level: str) -> list:
    def grid(kn_pairs, ranks, tokens):
        return [dict(tokens=m, K=k, N=n, r=r) for k, n in kn_pairs for r in ranks for m in tokens]

    if device_type == "cuda":
        if level == "quick":
            return grid([(4096, 4096)], [16], [1, 4096])
        pairs = [(4096, 4096), (8192, 8192), (4096, 14336)]
        if level == "full":
            return grid(pairs + [(14336, 4096)], [8, 16, 64], [1, 16, 512, 4096, 8192])
        return grid(pairs, [16], [1, 16, 512, 4096, 8192])
    if level == "quick":
        return grid([(256, 256)], [16], [1, 64])
    if level == "full":
        return grid([(1024, 1024), (4096, 4096)], [8, 16, 64], [1, 16, 256, 2048])
    return grid([(1024, 1024)], [16], [1, 16, 256, 2048]) + grid([(4096, 4096)], [16], [1])


def _make_case(shape: dict, device, dtype, mode: str) -> Case:
    m, k, n, r = shape["tokens"], shape["K"], shape["N"], shape["r"]
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    lora_A = trainable(torch.randn(r, k, device=device, dtype=dtype) / k**0.5, mode)
    lora_B = trainable(torch.randn(n, r, device=device, dtype=dtype) / r**0.5, mode)
    return Case(shape, device, dtype, mode, rotating_inputs(m, k, device, dtype, mode),
                upstream_grad(m, n, device, dtype, mode), dict(weight=weight, lora_A=lora_A, lora_B=lora_B))


def unfused_lora(x, weight, lora_A, lora_B, scaling: float):
    return F.linear(x, weight) + scaling * F.linear(F.linear(x, lora_A), lora_B)


def _base(case: Case) -> Built:
    (weight,) = case_tensors(case, "weight")
    return Built(lambda x: F.linear(x, weight))


def _fastpeft(case: Case) -> Built:
    from fastpeft.ops import lora_linear

    weight, lora_A, lora_B = case_tensors(case, "weight", "lora_A", "lora_B")
    return Built(lambda x: lora_linear(x, weight, lora_A, lora_B, SCALING), [lora_A, lora_B])


def _torch(case: Case) -> Built:
    weight, lora_A, lora_B = case_tensors(case, "weight", "lora_A", "lora_B")
    return Built(lambda x: unfused_lora(x, weight, lora_A, lora_B, SCALING), [lora_A, lora_B])


def _compiled(case: Case) -> Built:
    weight, lora_A, lora_B = case_tensors(case, "weight", "lora_A", "lora_B")
    fn = compiled(unfused_lora)
    return Built(lambda x: fn(x, weight, lora_A, lora_B, SCALING), [lora_A, lora_B], note="dynamic=True")


def peft_lora_layer(weight, lora_A, lora_B, scaling: float, mode: str):
    """A PEFT ``lora.Linear`` over an ``nn.Linear`` holding ``weight``, with copies of A and B."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    n, k = weight.shape
    r = lora_A.shape[0]
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = torch.nn.Parameter(weight, requires_grad=False)
    alpha = scaling * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer.to(device=weight.device, dtype=weight.dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(lora_A)
        b.copy_(lora_B)
    layer.train(mode != FORWARD)
    return layer, [a, b]


def _peft(case: Case) -> Built:
    weight, lora_A, lora_B = case_tensors(case, "weight", "lora_A", "lora_B")
    layer, params = peft_lora_layer(weight, lora_A, lora_B, SCALING, case.mode)
    return Built(layer, params)


def _work(shape: dict, mode: str, provider: str, dtype) -> tuple:
    """Ideal (flops, bytes) with a dense base weight."""
    weight_bytes = shape["N"] * shape["K"] * torch.empty((), dtype=dtype).element_size()
    return lora_layer_work(shape, mode, provider, dtype, weight_bytes)


OP = OpBench(
    name="lora",
    title="LoRA linear",
    providers=[
        Provider("base", _base),
        Provider("fastpeft", _fastpeft, missing_import("fastpeft.ops"), ours=True),
        Provider("peft", _peft, missing_import("peft")),
        Provider("torch", _torch),
        Provider("compile", _compiled),
    ],
    shapes=_shapes,
    make_case=_make_case,
    work=_work,
    baseline="base",
    reference="torch",
    dtypes=both_precisions_on_cpu,
    headline=("base", "fastpeft", "peft"),
)
