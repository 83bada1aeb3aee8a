"""The CUDA decode GEMV's arithmetic (nf4::gemv_byte_terms in csrc/include/fastpeft/nf4_codec.h) on the host.

The CUDA GEMV sums these terms, so this is the test of its element arithmetic on
a machine without a GPU. Each weight is dequantized alone (``fp32(code ·
absmax)``), rounded to the activation dtype, then multiplied by its activation:
the block scale is applied per element, before the sum, as bitsandbytes
(dequantize, then matmul) and the Triton kernels do. The expected terms are
computed here with torch from the published NF4 table. The driver is compiled
without FMA contraction, so each product and the pair's sum round once in fp32.
"""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpeft.quant.nf4 import NF4_CODE_VALUES

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "isa" / "gemv_term_driver.cpp"


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler is not None, "no C++ compiler (the native extension needs one too)"
    binary = tmp_path_factory.mktemp("gemv_term") / "gemv_term_driver"
    build = subprocess.run([compiler, "-O2", "-ffp-contract=off", "-std=c++17", f"-I{REPO / 'csrc' / 'include'}",
                            str(DRIVER), "-o", str(binary)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return binary


@pytest.mark.parametrize("rounding", ["fp32", "bf16"])
def test_each_weight_is_scaled_and_rounded_before_its_product(driver, tmp_path, rounding):
    nbytes, blocksize = 4096, 64
    gen = torch.Generator(device="cpu").manual_seed(5)  # host data for a host program
    packed = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen, device="cpu")
    absmax = torch.rand(2 * nbytes // blocksize, generator=gen, device="cpu") * 3 + 0.01
    x = torch.randn(2 * nbytes, generator=gen, device="cpu")
    for name, t in (("packed", packed), ("absmax", absmax), ("x", x)):
        t.numpy().tofile(tmp_path / f"{name}.bin")
    run = subprocess.run([str(driver), str(tmp_path), str(nbytes), str(blocksize), rounding], capture_output=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    got = torch.from_numpy(np.fromfile(tmp_path / "terms.bin", dtype=np.float32))

    b = packed.to(torch.int64)
    codes = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)[torch.stack([b >> 4, b & 0xF], 1).reshape(-1)]
    w = codes * absmax.repeat_interleave(blocksize)  # one fp32 multiply per element
    if rounding == "bf16":
        w = w.to(torch.bfloat16).float()
    products = (w * x).view(nbytes, 2)
    expected = products[:, 0] + products[:, 1]
    assert torch.equal(got, expected)
    # the former arithmetic (scale after the sum) differs, so this test tells the two apart
    after = (codes * x).view(nbytes, 2).sum(1) * absmax.repeat_interleave(blocksize // 2)
    assert not torch.equal(after, expected)
