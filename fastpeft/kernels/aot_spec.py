"""What the ahead-of-time kernel report compiles (DESIGN.md §3).

Every module of Triton kernels exposes ``aot_specs() -> list[KernelSpec]``,
one entry per (kernel, launch config) its launchers can pick, and is listed in
``KERNEL_MODULES``. ``fastpeft.tools.kernel_report`` compiles each entry for
sm_80 and sm_90 without a GPU and reads registers, spills, shared memory and
tensor-core instructions from the cubin.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KERNEL_MODULES = (
    "fastpeft.kernels.lora",
    "fastpeft.kernels.nf4",
)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel in one launch configuration, as ``triton.compile`` needs it.

    ``signature`` maps every argument name to its Triton type ("*fp16", "*fp32",
    "i32", "fp32", ... or "constexpr"); ``constexprs`` gives the constexpr
    values. ``is_gemm`` marks kernels whose inner loop is a ``tl.dot`` and must
    use tensor-core instructions. ``attrs`` passes ``ASTSource`` attributes,
    e.g. ``{(arg_index,): [["tt.divisibility", 16]]}`` for the alignment the
    JIT would see on real tensors.
    """

    name: str
    fn: Any
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    is_gemm: bool = True
    attrs: dict = field(default_factory=dict)
