"""int64 offsets: no Triton kernel builds a memory address from an int32 product that can pass 2**31.

``gates.offset_check`` (the static check; its docstring says how it
works) lowers every variant the kernel modules launch to Triton IR and reports
each int32 multiplication of two runtime values, or of a stride, that flows
into a ``tt.addptr`` offset. Here: it reports each known bug pattern of
``offset_fixture_kernels`` and nothing in a correctly widened kernel; the
pattern it reports really wraps (the interpreter multiplies in int32 as the
GPU does); and every fastpeft kernel module passes it.
"""
import os
import sys

import pytest
import torch

from gates.offset_check import check_modules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the fixture module, also for the child check
import offset_fixture_kernels as fixture  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fixture_findings():
    return check_modules([fixture.__name__])


def test_the_check_reports_every_known_int32_address_product_and_nothing_else(fixture_findings):
    found = {(f.function, f.source) for f in fixture_findings}
    for kernel, fragment in fixture.FLAGGED:
        assert any(k == kernel and fragment in source for k, source in found), (kernel, fragment, found)
    assert len(fixture_findings) == len(fixture.FLAGGED), "\n".join(map(str, fixture_findings))


def test_a_finding_names_the_source_line_and_both_factors(fixture_findings):
    by_kernel = {f.function: f for f in fixture_findings}
    row = by_kernel["_row_times_stride_kernel"]
    assert row.location.startswith("tests/gates/offset_fixture_kernels.py:")
    assert set(row.factors) == {"rows", "stride_xm"}
    assert "stride_xk" in by_kernel["_narrow_pointer_step_kernel"].factors
    assert set(by_kernel["_product_in_a_branch_kernel"].factors) == {"program_id", "stride_xb"}


def test_a_reported_product_really_wraps():
    """Row 3 at row stride (2**32 + 2) / 3 (an int32) is element 4294967298; in int32 it is element 2."""
    stride = (2**32 + 2) // 3
    assert stride < 2**31 and 3 * stride == 2**32 + 2
    x = torch.arange(16, dtype=torch.float32)
    y = torch.full((4, 2), float("nan"))
    fixture._row_times_stride_kernel[(1,)](x, y, 4, stride, BLOCK_M=4, BLOCK_N=2)  # loads rows 0 and 3 only
    assert y[0].tolist() == [0.0, 1.0]
    assert y[3].tolist() == [2.0, 3.0]  # silently read x[2:4] instead of faulting or reading the right element


# int32 products the kernels keep on purpose, by (kernel, a fragment of the source line), and why. The list
# may only shrink: an entry the check no longer reports fails the test.
ACCEPTED = {
    ("_lora_reduce_kernel", "s_ptrs += BLOCK_M * stride_sm"):
        "the row step of the dA/dB reduction: in int64 it costs 32 registers on sm_80 (bf16 dropout variant "
        "95 -> 127) and 8 on sm_90 (40 -> 48); it wraps only for a row stride >= 2**31 / BLOCK_M elements",
    ("_adapter_forward_kernel", "part_ptrs += M * B"):
        "the split-K partials' step: split-K runs only for few rows (M <= 33 row blocks), so M * B < 2**20; "
        "in int64 it cost 12 registers on sm_80 (b=256: 64 -> 76, 4 -> 3 CTAs/SM)",
    ("_adapter_backward_rows_kernel", "offs_b[None, :] * stride_uwb"):
        "bottleneck column (< 256) times W_u's column stride: wraps only for a stride >= 2**23; in int64 the two "
        "offs_b products of this kernel cost 13 registers on sm_90 (fp16 linear: 127 -> 140, 2 -> 1 CTAs/SM)",
    ("_adapter_backward_rows_kernel", "offs_b[:, None] * stride_dwb"): "as the previous entry, for W_d",
}


def _accepted(finding, keys=None) -> bool:
    return any(finding.function == kernel and fragment in finding.source for kernel, fragment in keys or ACCEPTED)


def test_every_kernel_module_computes_its_addresses_in_int64():
    found = check_modules()
    unexpected = [f for f in found if not _accepted(f)]
    assert not unexpected, ("int32 products reach an address; widen a factor (`.to(tl.int64)`, or "
                            "`tl.cast(stride, tl.int64)` for a step):\n" + "\n".join(map(str, unexpected)))
    stale = {key for key in ACCEPTED if not any(_accepted(f, [key]) for f in found)}
    assert not stale, f"accepted int32 products no longer found (remove them from ACCEPTED): {sorted(stale)}"
