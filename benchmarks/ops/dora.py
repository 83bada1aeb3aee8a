"""DoRA linear (``use_dora=True``): fastpeft's factored DoRA against PEFT's DoRA layer, and the cost of the variant.

Providers: fastpeft's plain ``lora_linear`` (the baseline: the overhead
column is DoRA's cost over fastpeft LoRA), fastpeft ``dora_linear`` (with
``‖W‖²`` cached, as its layers run it), HF PEFT's DoRA ``lora.Linear`` (the
reference) and PEFT's plain LoRA layer (what DoRA costs in PEFT). Backward
modes: W frozen, A, B and the magnitude trainable, x needs grad. No bias, as
in Llama.
"""
from __future__ import annotations

import torch

from ..suite.spec import FORWARD, Built, Case, OpBench, Provider
from .common import both_precisions_on_cpu, case_tensors, missing_import, rotating_inputs, trainable, upstream_grad
from .lora import SCALING
from .lora import _peft as _peft_lora
from .lora import _work  # the LoRA layer's ideal work; DoRA's norm (r·K·N) and scale passes are not counted


def _shapes(device_type: str, level: str) -> list:
    def grid(kn_pairs, ranks, tokens):
        return [dict(tokens=m, K=k, N=n, r=r) for k, n in kn_pairs for r in ranks for m in tokens]

    if device_type == "cuda":
        if level == "quick":
            return grid([(4096, 4096)], [16], [1, 4096])
        return grid([(4096, 4096), (8192, 8192), (4096, 14336)], [16], [1, 16, 512, 4096, 8192])
    if level == "quick":
        return grid([(256, 256)], [16], [1, 64])
    if level == "full":
        return grid([(1024, 1024), (4096, 4096)], [16], [1, 256, 2048])
    return grid([(1024, 1024)], [16], [256, 2048]) + grid([(4096, 4096)], [16], [256])


def _make_case(shape: dict, device, dtype, mode: str) -> Case:
    m, k, n, r = shape["tokens"], shape["K"], shape["N"], shape["r"]
    weight = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
    a = torch.randn(r, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(n, r, device=device, dtype=dtype) / r**0.5
    norm = (weight.double() + SCALING * b.double() @ a.double()).norm(dim=1)
    magnitude = (norm * (1 + 0.1 * torch.rand(n, device=device, dtype=torch.float64))).to(dtype)
    tensors = dict(weight=weight, lora_A=trainable(a, mode), lora_B=trainable(b, mode),
                   magnitude=trainable(magnitude, mode))
    return Case(shape, device, dtype, mode, rotating_inputs(m, k, device, dtype, mode),
                upstream_grad(m, n, device, dtype, mode), tensors)


def _fastpeft_lora(case: Case) -> Built:
    from fastpeft.ops import lora_linear

    weight, lora_A, lora_B = case_tensors(case, "weight", "lora_A", "lora_B")
    return Built(lambda x: lora_linear(x, weight, lora_A, lora_B, SCALING), [lora_A, lora_B])


def _fastpeft(case: Case) -> Built:
    from fastpeft.ops import dora_linear
    from fastpeft.ops.dora import weight_row_norm_sq

    weight, lora_A, lora_B, magnitude = case_tensors(case, "weight", "lora_A", "lora_B", "magnitude")
    weight_norm_sq = weight_row_norm_sq(weight)  # what a DoRA layer caches while W is frozen
    return Built(lambda x: dora_linear(x, weight, lora_A, lora_B, magnitude, SCALING,
                                       weight_norm_sq=weight_norm_sq), [lora_A, lora_B, magnitude])


def _peft_dora(case: Case) -> Built:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    weight, lora_A, lora_B, magnitude = case_tensors(case, "weight", "lora_A", "lora_B", "magnitude")
    n, k = weight.shape
    r = lora_A.shape[0]
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = torch.nn.Parameter(weight, requires_grad=False)
    alpha = SCALING * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, use_dora=True)
    layer = PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer.to(device=weight.device, dtype=weight.dtype)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    with torch.no_grad():
        for p, value in zip(params, (lora_A, lora_B, magnitude)):
            p.copy_(value)
    layer.train(case.mode != FORWARD)
    return Built(layer, params)


OP = OpBench(
    name="dora",
    title="DoRA linear",
    providers=[
        Provider("lora", _fastpeft_lora, missing_import("fastpeft.ops")),
        Provider("fastpeft", _fastpeft, missing_import("fastpeft.ops"), ours=True),
        Provider("peft", _peft_dora, missing_import("peft")),
        Provider("peft_lora", _peft_lora, missing_import("peft")),
    ],
    shapes=_shapes,
    make_case=_make_case,
    work=_work,
    baseline="lora",
    reference="peft",
    dtypes=both_precisions_on_cpu,
    headline=("lora", "fastpeft", "peft", "peft_lora"),
)
