"""DoRA's Triton kernels under the interpreter against float64 (``fastpeft.kernels.dora``)."""
import pytest
import torch

from fastpeft.kernels.dora import dora_grad_scale
from numerics import assert_close_to_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(1, 5), (33, 130), (1100, 7)])
def test_grad_scale_and_magnitude_sums_against_float64(dtype, m, n):
    dy, z = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    scale, norm = torch.rand(n) + 0.5, torch.rand(n) + 0.5
    g, dm = dora_grad_scale(dy, z, scale, norm, True)
    g_ref = dy.double() * scale.double()
    dm_ref = (dy.double() * z.double()).sum(0) / norm.double()
    assert_close_to_ref(g, g_ref, (dy * scale.to(dtype)), what="g")
    assert_close_to_ref(dm, dm_ref, (dy * z).sum(0, dtype=torch.float32) / norm, what="dm")


def test_each_half_alone_and_a_strided_dy():
    dy = torch.randn(40, 24)[:, ::2]
    z = torch.randn(40, 12)
    scale, norm = torch.rand(12) + 0.5, torch.rand(12) + 0.5
    g, dm = dora_grad_scale(dy, None, scale, norm, True)
    assert dm is None
    torch.testing.assert_close(g, dy * scale)
    g, dm = dora_grad_scale(dy, z, scale, norm, False)
    assert g is None
    torch.testing.assert_close(dm, (dy * z).sum(0) / norm)
