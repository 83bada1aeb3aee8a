"""The ahead-of-time gate for the prefix-attention Triton kernels (sm_80 and sm_90, no GPU needed).

Uses the session's one kernel report (tests/tools/conftest.py). Every variant
``fastpeft.kernels.prefix_attention.aot_launches`` records (fp32/fp16/bf16, D
in {64, 128}, HF layouts, lengths that are multiples of 16 or not, decode,
causal or not, padding mask, no prefix) must compile without spills, within
255 registers and shared memory, and every fp16/bf16 forward, dK/dV and dQ
variant must run its dots on tensor cores. The Δ preprocessing kernel and the
fp32 ("ieee" FMA) variants are not GEMMs.

Known gap, kept visible as a strict xfail: on sm_90 the kernels wait for
every wgmma (see ``test_sm90_wgmma_stays_in_flight``).
"""
import pytest

pytestmark = pytest.mark.slow

ARCHES = (80, 90)
MODULE = "fastpeft.kernels.prefix_attention"
WGMMA_WAIT = "wgmma main loop waits for every wgmma"


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


def test_every_variant_passes_the_gate_but_wgmma_overlap(rows):
    bad = [f"{r.name} sm_{r.arch}: {', '.join(p for p in r.problems() if p != WGMMA_WAIT)}" for r in rows
           if [p for p in r.problems() if p != WGMMA_WAIT]]
    assert not bad, "\n".join(bad)
    assert all(r.registers > 0 for r in rows)


def test_half_precision_variants_use_tensor_cores(rows):
    for r in rows:
        if "_delta[" in r.name or "[fp32," in r.name:
            assert not r.is_gemm, r.name
        else:
            assert r.is_gemm and r.tensor_core != "none", r.name


@pytest.mark.xfail(strict=True, reason="known gap: in an FA2-style loop every wgmma result is consumed in its own "
                   "iteration (QKᵀ by the softmax, PV rescaled by the next block's max, dPᵀ by dS), so Triton 3.8 "
                   "waits for every wgmma (DEPBAR.LE gsb0, 0x0) on sm_90; warp_specialize does not compile there")
def test_sm90_wgmma_stays_in_flight(rows):
    waiting = sorted({r.name for r in rows if WGMMA_WAIT in r.problems()})
    assert not waiting, waiting
