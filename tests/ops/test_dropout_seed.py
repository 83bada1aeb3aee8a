"""The dropout seed (fastpeft/ops/_dropout_seed.py) comes from torch's CPU generator whatever the default device.

Under ``torch.set_default_device("cuda")`` a seed drawn on the default device
would live on the GPU and the launcher's ``.item()`` would synchronise every
forward and backward; the meta device stands in for the GPU here (a seed
drawn there has no value at all, so the test fails if the draw follows it).
"""
import torch

from fastpeft.ops._dropout_seed import SEED_LIMIT, draw_seed, seed_value


def test_seed_is_drawn_on_the_cpu_generator_under_another_default_device():
    before = torch.get_default_device()
    torch.manual_seed(3)
    expected = int(torch.randint(0, SEED_LIMIT, (), dtype=torch.int64, device="cpu"))
    torch.manual_seed(3)
    torch.set_default_device("meta")
    try:
        seed = draw_seed(0.1)
    finally:
        torch.set_default_device(before)
    assert seed.device == torch.device("cpu") and seed.dtype == torch.int64
    assert seed_value(seed) == expected


def test_no_seed_without_dropout():
    assert draw_seed(0.0) is None and seed_value(None) == 0
