"""The ahead-of-time gate for the NF4 decode GEMV (``_nf4_decode_gemv_kernel``), sm_80 and sm_90, no GPU needed.

Uses the session's one kernel report (tests/gates/conftest.py); the gate
itself (no spills, registers, shared memory, headline grids) is
tests/gates/test_kernel_report.py. Rows are found by kernel name, not by
module: once ``nf4_matmul`` launches ``nf4_gemv`` for M <= 16, the variants it
shares are reported under ``fastpeft.kernels.nf4`` with its labels. Here:
every dtype and both token-row configs (one and two rows per program) are
compiled for both arches, the weight bytes arrive in 128-bit loads, and
registers allow at least 4 CTAs per SM (the decode grid is N / 4 programs,
1024 at N = 4096). No variant is a GEMM: the products run on FMA units.
"""
import pytest

pytestmark = pytest.mark.slow

ARCHES = (80, 90)
KERNEL = "nf4_decode_gemv["


@pytest.fixture(scope="module")
def gemv_rows(report_rows):
    return [r for r in report_rows if r.name.startswith(KERNEL)]


def test_every_gemv_variant_is_compiled_for_every_arch(gemv_rows):
    names = {r.name for r in gemv_rows}
    # gates.aot.nf4_gemv.aot_launches: 3 dtypes x 2 token-row configs x (plain and bias + LoRA at blocksize 64, plain at
    # 128 and at a ragged K), less the two-row configs of fp32 and bf16 at a ragged K (one row per program there)
    assert len(names) >= 23, sorted(names)
    assert sorted((r.name, r.arch) for r in gemv_rows) == sorted((n, a) for n in names for a in ARCHES)
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(dtype in n for n in names), dtype


def test_gemv_loads_weight_bytes_128_bits_wide_and_fits_4_ctas_per_sm(gemv_rows):
    for r in gemv_rows:
        assert not r.is_gemm, r.name
        assert r.load_bits == 128, (r.name, r.arch, r.load_bits)
        assert r.spills == 0, (r.name, r.arch)
        assert r.ctas_per_sm >= 4, (r.name, r.arch, r.registers, r.shared_bytes)


def _token_rows_per_program(name: str) -> int:
    """Token rows one program of the variant ``name`` handles (``nf4_gemv.gemv_config``); K is 4096 unless named."""
    import re

    import torch

    from fastpeft.kernels.nf4_gemv import gemv_config

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name.split("[")[1].split(",")[0]]
    m = int(re.search(r"[\[,]m(\d+)\b", name).group(1))
    k = re.search(r",k(\d+)\b", name)
    return gemv_config(m, dtype, int(k.group(1)) if k else 4096).block_m


# Main-loop SASS instructions per weight (one trip: 16 bytes = 32 weights per thread), by token rows per program.
# Measured when the kernel landed: at most 8.1 (one row) and 10.1 (two rows) on sm_80/sm_90; the former
# _nf4_gemv_kernel took 33-35 per weight at one row. A ratchet: lower it when the loop gets cheaper.
MAX_INSTRUCTIONS_PER_WEIGHT = {1: 8.5, 2: 10.5}


def test_gemv_main_loop_costs_few_instructions_per_weight_and_reads_no_bytes(gemv_rows):
    for r in gemv_rows:
        assert r.loop_instructions > 0 and r.loop_byte_loads == 0, (r.name, r.arch, r.loop_byte_loads)
        per_weight = r.loop_instructions / 32
        bound = MAX_INSTRUCTIONS_PER_WEIGHT[_token_rows_per_program(r.name)]
        assert per_weight <= bound, (r.name, r.arch, round(per_weight, 2), bound)
