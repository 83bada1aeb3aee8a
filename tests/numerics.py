"""Error measures of docs/architecture.md ("Numerics and tests"): relative error, and budgets relative to torch."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (tiny denominators guarded)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def assert_close_to_ref(out, ref, torch_out, *, c: float = 4.0, tiny: float = 1e-12, what: str = "output"):
    """err(out) <= c · err(torch_out) + tiny, both against the float64 ``ref``."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    e_out, e_torch = rel_err(out, ref), rel_err(torch_out, ref)
    assert e_out <= c * e_torch + tiny, f"{what}: error {e_out:.3e} > {c} x torch's {e_torch:.3e} + {tiny:g}"


def reduction_floor(abs_terms: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The rounding floor, relative to ``‖ref‖``, of a result that sums ``n`` terms per element in ``dtype``.

    ``abs_terms`` is ``[n, *ref.shape]``: the float64 magnitudes of the terms each element of ``ref`` sums.
    The probabilistic bound on an ``n``-term floating-point sum (Higham and Mary, 2019) is
    ``√n · u · Σ|terms|`` per element, ``u`` the unit roundoff of ``dtype``; a sum with cancellation
    (``Σ|terms| ≫ |Σ terms|``) is as accurate as that and no more, whoever computes it, so a budget
    relative to torch's own error on one draw needs this floor beside it.
    """
    n = abs_terms.shape[0]
    u = torch.finfo(dtype).eps / 2
    floor = (n ** 0.5) * u * abs_terms.double().sum(0).norm()
    return float(floor / ref.detach().double().norm().clamp_min(1e-300))
