"""The ahead-of-time gate for the prefix-attention Triton kernels (sm_80 and sm_90, no GPU needed).

Uses the session's one kernel report (tests/gates/conftest.py). Every variant
``gates.aot.prefix_attention.aot_launches`` records (fp32/fp16/bf16, D
in {64, 128}, HF layouts, lengths that are multiples of 16 or not, decode,
causal or not, padding mask, no prefix) must compile without spills, within
255 registers and shared memory, and every fp16/bf16 forward, dK/dV and dQ
variant must run its dots on tensor cores. The Δ preprocessing kernel and the
fp32 ("ieee" FMA) variants are not GEMMs. The gate itself, and the known
sm_90 gap (these loops wait for every wgmma), are in
``tests/gates/test_kernel_report.py``.
"""
import pytest

pytestmark = pytest.mark.slow

ARCHES = (80, 90)
MODULE = "fastpeft.kernels.prefix_attention"


@pytest.fixture(scope="module")
def rows(report_rows):
    return [r for r in report_rows if r.module == MODULE]


def test_every_variant_is_compiled_for_every_arch(rows):
    names = {r.name for r in rows}
    assert len(names) > 60
    for arch in ARCHES:
        assert sorted(r.name for r in rows if r.arch == arch) == sorted(names)


def test_variants_cover_every_kernel_dtype_head_dim_and_flag(rows):
    names = {r.name for r in rows}
    for kernel in ("fwd", "dkdv", "dq"):
        for dtype in ("fp32", "fp16", "bf16"):
            for d in ("d64", "d128"):
                for tag in ("prefix,", "prefix,causal,", "prefix,causal,mask,", "noprefix,causal,"):
                    assert any(n.startswith(f"prefix_attention_{kernel}[{dtype},{d},{tag}") for n in names), \
                        (kernel, dtype, d, tag)
    for dtype in ("fp32", "fp16", "bf16"):
        assert f"prefix_attention_delta[{dtype},d64,delta]" in names
    assert any(",fwd_decode]" in n for n in names)


def test_half_precision_variants_use_tensor_cores(rows):
    for r in rows:
        if "_delta[" in r.name or "[fp32," in r.name:
            assert not r.is_gemm, r.name
        else:
            assert r.is_gemm and r.tensor_core != "none", r.name
