"""TF32 variants in the kernel report (gates/tf32.py): recorded, compiled for sm_80 and sm_90, gated.

With torch's TF32 setting on, fp32 operands multiply on tensor cores: a
variant of its own for every fp32 launch with a ``tl.dot``. The report holds
them as ``[tf32,...]`` rows beside the exact fp32 ones; the gate
(``test_every_variant_passes_the_gate``) covers them, less the problems
``KNOWN_TF32`` lists with reasons, a list that may only shrink.
"""
import torch

from gates.kernel_report import KNOWN_TF32
from gates.tf32 import tf32_allowed, tf32_name

ARCHES = (80, 90)
DOT_KERNELS = {"adapter_down", "adapter_forward", "adapter_backward_rows", "adapter_reduce", "lora_shrink",
               "lora_fused_gemm", "lora_reduce", "nf4_matmul", "nf4_matmul_t", "prefix_attention_fwd",
               "prefix_attention_dkdv", "prefix_attention_dq"}


def test_every_fp32_gemm_kernel_has_tf32_rows_on_both_arches_and_they_are_gemms(report_rows):
    tf32 = [r for r in report_rows if "[tf32" in r.name]
    assert {(r.name.split("[")[0], r.arch) for r in tf32} >= {(k, a) for k in DOT_KERNELS for a in ARCHES}
    assert all(r.is_gemm and r.tensor_core != "none" for r in tf32), [r.name for r in tf32 if not r.is_gemm]


def test_known_tf32_problems_still_show(report_rows):
    for (prefix, arch), (problem, _) in KNOWN_TF32.items():
        rows = [r for r in report_rows if r.arch == arch and r.name.startswith(prefix)]
        assert rows, f"{prefix} sm_{arch}: no such row; remove it from KNOWN_TF32"
        assert any(p.startswith(problem) for r in rows for p in r.problems()), \
            f"{prefix} sm_{arch} no longer shows {problem!r}: remove it from KNOWN_TF32"


def test_tf32_setting_is_restored_and_names_follow():
    before = torch.backends.cuda.matmul.fp32_precision
    with tf32_allowed():
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert tf32_name("lora_shrink[fp32,r8,m16,fwd]") == "lora_shrink[tf32,r8,m16,fwd]"
    assert tf32_name("k[x]") == "k[x,tf32]"
