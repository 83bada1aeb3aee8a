"""Ahead-of-time specs of the LoRA kernels: exactly the variants the launchers in ``lora.py`` run.

The Triton JIT compiles one variant per set of constexprs *and* per
specialisation of the integer arguments: a stride equal to 1 becomes a
constant, and pointers/integers divisible by 16 carry a divisibility hint.
Each kernel is launched in several roles (the forward and backward use of
one kernel with permuted strides), and each role has its own unit strides,
so every role is listed here with the specialisation it gets for contiguous,
16-byte-aligned tensors, feature sizes K and N that are multiples of 16 and
any rank r (rank-sized strides get no hint). Without the hint on the loop
length the masked loads cannot be vectorised and the loop is not pipelined.

Feature flags: a role that can run with dropout (forward shrink, dA, dx) or
with a bias (forward GEMM) is listed with the flag on; the same role with the
flag off compiles the same loops minus that code and is not listed again. The
roles without dropout (dy shrink, dB, dx without dropout) are compiled with
the flag off, so each kernel's flag-off form is in the report too.
"""
from __future__ import annotations

import torch

from . import _lora_configs as cfg
from ._lora_kernels import _dropout_keep_kernel, _lora_fused_gemm_kernel, _lora_reduce_kernel, _lora_shrink_kernel
from .aot_spec import KernelSpec

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
REPORT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DIV16 = [["tt.divisibility", 16]]

# role -> (unit strides, integer args with no divisibility hint, DROPOUT)
SHRINK_ROLES = {
    "x": ({"stride_sl", "stride_ml"}, {"M", "R"}, True),  # h = s·drop(x) Aᵀ; A [r, K]
    "dy": ({"stride_sl", "stride_mr"}, {"M", "R", "stride_ml"}, False),  # dh = s·dy B; B [N, r]
}
GEMM_ROLES = {
    # y = h Bᵀ + x Wᵀ + b: W read as Wᵀ, B as Bᵀ
    "fwd": ({"stride_sl", "stride_ml", "stride_lr"}, {"M", "R", "stride_ln"}),
    # dx = dh A + dy W
    "dx": ({"stride_sl", "stride_mn", "stride_ln"}, {"M", "R"}),
}
REDUCE_ROLES = {
    "dA": ({"stride_sp", "stride_or"}, {"M", "R", "stride_op"}, True),  # dA = dhᵀ drop(x)
    "dB": ({"stride_sp", "stride_or"}, {"M", "R", "stride_op"}, False),  # dB = dyᵀ h
}


def _spec(name, fn, pointers: dict, floats: set, units: set, unhinted: set, constexprs: dict,
          num_warps: int, num_stages: int, is_gemm: bool) -> KernelSpec:
    constexprs = {**constexprs, **{unit: 1 for unit in units}}
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
            attrs[(index,)] = _DIV16
        elif arg in floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg not in unhinted and not arg.startswith("seed"):
                attrs[(index,)] = _DIV16
    return KernelSpec(name, fn, signature, constexprs, num_warps, num_stages, is_gemm, attrs)


def lora_aot_specs(precision_of, tensor_cores_of) -> list[KernelSpec]:
    """All specs; ``precision_of(dtype)`` gives the dot precision the launchers use,
    ``tensor_cores_of(dtype)`` whether that precision runs on tensor cores."""
    specs = []
    for dtype in REPORT_DTYPES:
        t, prec, tc = _TRITON_DTYPE[dtype], precision_of(dtype), tensor_cores_of(dtype)
        common = {"PREC": prec, "UPCAST": False}
        for role, (units, unhinted, dropout) in SHRINK_ROLES.items():
            for c in cfg.shrink_configs(dtype):
                for block_r in cfg.RANK_BLOCKS:
                    specs.append(_spec(
                        f"lora_shrink[{t},{role},{c.name},r{block_r}]", _lora_shrink_kernel,
                        {"src": f"*{t}", "mat": f"*{t}", "out": "*fp32"}, {"scale", "p"}, units, unhinted,
                        {"BLOCK_M": c.block_a, "BLOCK_L": c.block_b, "BLOCK_R": block_r, "DROPOUT": dropout,
                         **common}, c.num_warps, c.num_stages, tc))
        gemm_variants = [("fwd", True, False, cfg.gemm_configs(dtype)),
                         ("dx", False, False, cfg.gemm_configs(dtype)),
                         ("dx", False, True, cfg.gemm_configs(dtype, dropout=True))]
        for role, has_bias, dropout, configs in gemm_variants:
            units, unhinted = GEMM_ROLES[role]
            for c in configs:
                tag = role + ("_dropout" if dropout else "")
                specs.append(_spec(
                    f"lora_fused_gemm[{t},{tag},{c.name}]", _lora_fused_gemm_kernel,
                    {name: f"*{t}" for name in ("src", "mat", "lmat", "bias", "out")} | {"lhs": "*fp32"},
                    {"drop_scale", "p"}, units, unhinted,
                    {"HAS_BIAS": has_bias, "DROPOUT": dropout, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
                     "BLOCK_L": c.block_k, "BLOCK_R": cfg.GEMM_RANK_BLOCK, "GROUP_M": cfg.GROUP_M, **common},
                    c.num_warps, c.num_stages, tc))
        for role, (units, unhinted, dropout) in REDUCE_ROLES.items():
            for c in cfg.reduce_configs(dtype):
                for block_r in cfg.RANK_BLOCKS:
                    specs.append(_spec(
                        f"lora_reduce[{t},{role},{c.name},r{block_r}]", _lora_reduce_kernel,
                        {"src": f"*{t}", "hmat": "*fp32", "out": "*fp32"}, {"scale", "p"}, units, unhinted,
                        {"BLOCK_P": c.block_a, "BLOCK_M": c.block_b, "BLOCK_R": block_r, "DROPOUT": dropout,
                         **common}, c.num_warps, c.num_stages, tc))
    block_m, block_k = cfg.MASK_BLOCK
    specs.append(_spec("lora_dropout_mask", _dropout_keep_kernel, {"out": "*i8"}, {"p"}, set(), {"M"},
                       {"BLOCK_M": block_m, "BLOCK_K": block_k}, 4, 1, False))
    return specs
