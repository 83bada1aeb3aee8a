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
