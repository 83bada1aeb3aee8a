"""The ahead-of-time gate for the bottleneck-adapter Triton kernels (sm_80 and sm_90, no GPU needed).

Uses the session's one kernel report (tests/gates/conftest.py). Every variant
``gates.aot.adapter.aot_launches`` records (H in {768, 4096}, b in {48,
64, 256}, fp32/fp16/bf16, every feature flag, every activation) must compile
without spills, within 255 registers and shared memory (the gate itself is
``tests/gates/test_kernel_report.py``), and every fp16/bf16 variant must run
its dots on tensor cores (HMMA, or HGMMA on sm_90); fp32 variants use exact
"ieee" dots on the FMA units by default.
"""
import pytest


pytestmark = pytest.mark.slow

ARCHES = (80, 90)


@pytest.fixture(scope="module")
def adapter_rows(report_rows):
    return [r for r in report_rows if r.module == "fastpeft.kernels.adapter"]


def test_every_adapter_variant_is_compiled_for_every_arch(adapter_rows):
    names = {r.name for r in adapter_rows}
    assert len(names) > 50
    assert sorted((r.name, r.arch) for r in adapter_rows) == sorted((n, a) for n in names for a in ARCHES)


def test_half_precision_adapter_variants_use_tensor_cores(adapter_rows):
    for r in adapter_rows:
        if "mask" in r.name:
            assert not r.is_gemm
        elif "fp16" in r.name or "bf16" in r.name or "[tf32" in r.name:  # tf32: gates/tf32.py
            assert r.is_gemm and r.tensor_core != "none", r.name
        else:
            assert not r.is_gemm, r.name
    kernels = {r.name.split("[")[0] for r in adapter_rows if r.is_gemm}
    assert kernels == {"adapter_forward", "adapter_down", "adapter_backward_rows", "adapter_reduce"}


def test_the_largest_bottleneck_and_every_activation_are_covered(adapter_rows):
    names = {r.name for r in adapter_rows}
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(f"adapter_forward[{dtype},H768,b256" in n for n in names), dtype
    for act in ("gelu", "gelu_new", "quick_gelu", "silu", "tanh", "sigmoid", "leakyrelu", "linear", "mish", "relu6"):
        assert f"adapter_backward_rows[fp16,{act}]" in names, act
