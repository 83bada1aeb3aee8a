"""NF4Weight shapes whose element count does not fit int64 (issue 19, item 9).

torch's ``Size.numel`` wraps silently: ``(2**62, 4)`` counts 0 elements, so
an empty ``packed``/``absmax`` passed for a weight no machine could hold.
Every constructor (direct, bitsandbytes' saved quant state) refuses such a
shape with a ValueError naming it.
"""
import json

import pytest
import torch

from fastpeft.quant.nf4 import NF4Weight

OVERFLOWING = [(2 ** 62, 4), (2 ** 32, 2 ** 32), (2 ** 40, 2 ** 40), (3, 2 ** 63), (2 ** 70, 2)]


@pytest.mark.parametrize("shape", OVERFLOWING)
def test_overflowing_shape_raises_even_with_matching_wrapped_buffers(shape):
    with pytest.raises(ValueError, match="shape .*int64"):
        NF4Weight(torch.zeros(0, dtype=torch.uint8), shape, torch.float32, 64, torch.zeros(0))


def test_wrapped_count_of_zero_is_not_an_empty_weight():
    """The silent case: (2**62, 4) wraps to 0 elements, which empty buffers used to satisfy."""
    assert torch.Size([2 ** 62, 4]).numel() == 0  # the wrap this guards against
    with pytest.raises(ValueError, match="int64"):
        NF4Weight(torch.zeros(0, dtype=torch.uint8), (2 ** 62, 4), torch.float32, 64, torch.zeros(0))


def test_overflowing_shape_in_a_saved_quant_state_raises():
    sd = NF4Weight.from_float(torch.randn(8, 128), 64).to_bnb_state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key].tolist()))
    state["shape"] = [2 ** 62, 4]
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="int64"):
        NF4Weight.from_bnb_state_dict(sd)


def test_largest_countable_shape_still_reaches_the_buffer_check():
    with pytest.raises(ValueError, match="packed has 2 bytes"):
        NF4Weight(torch.zeros(2, dtype=torch.uint8), (2 ** 31, 2 ** 31), torch.float32, 64, torch.zeros(1))
