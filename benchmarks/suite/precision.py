"""Equal-precision bookkeeping: each provider's error against a float64 reference and the dtype it computed in.

Every (op, shape, mode) case is also run through a float64 copy of itself:
the op's reference provider (unfused torch) on the same inputs and the same
derived weights (e.g. the same NF4 codes) upcast to float64. A provider's
``rel_err`` is ``‖y - y64‖ / ‖y64‖`` on its forward output; the baseline (the
frozen base layer, which computes something else) is compared with its own
float64 run.

The *effective compute dtype* is read off that error, not declared by the
provider: a result computed in float32 lands near 1e-7..1e-5, one computed in
bfloat16 (8 significant bits) near 1e-3..1e-2 whatever dtype its inputs and
output have. That is how bitsandbytes' CPU forward shows up as bfloat16 for
float32 inputs on a CPU with AVX512-BF16. Bands (upper bounds, exclusive):

==============  ===========  =================================================
compute dtype   rel_err <    typical source
==============  ===========  =================================================
float64         1e-12        float64 math
float32         3e-5         float32 math, any accumulation order
tf32/float16    6e-4         10 significant bits: fp16 math, or TF32 matmuls
bfloat16        3e-2         8 significant bits: bf16 math, fp32 accumulation
lower           (above)      coarser than bf16, or a wrong result
==============  ===========  =================================================

An output can be no more precise than its own dtype, so a bfloat16 output is
at best ``bfloat16`` here even when the provider accumulated in float32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import FORWARD, Case

BANDS = ((1e-12, "float64"), (3e-5, "float32"), (6e-4, "tf32/float16"), (3e-2, "bfloat16"))
LOWER = "lower"
# Rank of each label, most precise first; a run dtype maps onto the label of its own precision.
_RANK = {name: i for i, (_, name) in enumerate(BANDS)} | {LOWER: len(BANDS)}
_DTYPE_LABEL = {"float64": "float64", "float32": "float32", "float16": "tf32/float16", "bfloat16": "bfloat16"}
SHORT = {"float64": "fp64", "float32": "fp32", "tf32/float16": "tf32/fp16", "float16": "fp16", "bfloat16": "bf16",
         LOWER: "lower"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def compute_dtype(err: Optional[float], dtype: str) -> str:
    """The dtype a result of relative error ``err`` was effectively computed in; "" when unknown.

    ``dtype`` is the provider's input/output dtype: the answer is never more
    precise than that.
    """
    if err is None or err != err:  # None or NaN
        return ""
    label = next((name for bound, name in BANDS if err < bound), LOWER)
    floor = _DTYPE_LABEL.get(dtype)
    if floor is not None and _RANK[floor] > _RANK[label]:
        return floor
    return label


def same_precision(compute: str, dtype: str) -> bool:
    """Whether a result computed in ``compute`` is at the precision of run dtype ``dtype``."""
    return compute == _DTYPE_LABEL.get(dtype, dtype)


def short(label: str) -> str:
    return SHORT.get(label, label)


def float64_case(case: Case) -> Case:
    """A forward-mode copy of ``case`` with every floating tensor upcast to float64 (detached).

    Only the first rotating input is kept (the one errors are measured on).
    Values that are not tensors (e.g. an ``NF4Weight`` a provider derived from
    the case's weight) are shared, so the float64 run reads the same codes.
    """
    def up(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().to(torch.float64)
        return v

    return Case(case.shape, case.device, torch.float64, FORWARD, [up(case.xs[0])], None,
                {k: up(v) for k, v in case.tensors.items()})
