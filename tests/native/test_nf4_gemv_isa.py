"""The fp32 NF4 GEMVs (csrc/cpu/nf4_gemv.cpp) compiled for each instruction set: AVX-512, AVX2, scalar.

The extension is built with -march=native, so on an AVX-512 machine its tests
only reach the AVX-512 kernel. Here the same source is compiled (no torch, with
``isa/nf4_gemv_driver.cpp``) for x86-64-v3 (AVX2 + FMA) and plain x86-64 (the
scalar codec), plus native when the CPU has AVX-512, and each binary's y = x·Wᵀ + b
(M = 1..8) and dx = dy·W (M = 1..4) are checked against float64 math on the same
NF4 codes. The driver fills its outputs with a sentinel, so a skipped element fails.
About 20 s, most of it compiling.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastpeft.quant.nf4 import NF4Weight
from numerics import assert_close_to_ref

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "isa" / "nf4_gemv_driver.cpp"
ERROR_FLOOR = 1e-6  # as in test_nf4_cpu_gemv.py: torch's own error is noisy over a few outputs


def _has_avx512f() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


ISAS = {"scalar": "-march=x86-64", "avx2": "-march=x86-64-v3"}
if _has_avx512f():
    ISAS["avx512"] = "-march=native"


@pytest.fixture(scope="module", params=list(ISAS))
def driver(request, tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler is not None, "no C++ compiler (the native extension needs one too)"
    binary = tmp_path_factory.mktemp(f"isa_{request.param}") / "nf4_gemv_driver"
    build = subprocess.run(
        [compiler, "-O2", ISAS[request.param], "-fopenmp", "-std=c++17", f"-I{REPO / 'csrc' / 'include'}",
         f"-I{REPO / 'csrc'}", str(DRIVER), str(REPO / "csrc" / "cpu" / "nf4_gemv.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    isa = subprocess.run([str(binary), "--isa"], capture_output=True, text=True, timeout=60).stdout.strip()
    assert isa == request.param, f"compiled with {ISAS[request.param]} but the driver runs the {isa} path"
    return binary


def _run(binary, tmp_path, x, dy, bias, w):
    m, k = x.shape
    n = w.shape[0]
    for name, t in (("x", x), ("dy", dy), ("bias", bias), ("absmax", w.absmax_float())):
        t.contiguous().numpy().tofile(tmp_path / f"{name}.bin")
    w.packed.contiguous().numpy().tofile(tmp_path / "packed.bin")
    run = subprocess.run([str(binary), str(tmp_path), str(m), str(n), str(k), str(w.blocksize)],
                         capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    y = torch.from_file(str(tmp_path / "y.bin"), size=m * n, dtype=torch.float32).reshape(m, n)
    dx = torch.from_file(str(tmp_path / "dx.bin"), size=m * k, dtype=torch.float32).reshape(m, k)
    return y, dx


@pytest.mark.parametrize("n, k, blocksize", [(37, 320, 64), (5, 1024, 256), (64, 128, 128), (3, 4096, 4096)])
def test_gemv_and_transposed_gemv(driver, tmp_path, n, k, blocksize):
    torch.manual_seed(n + k)
    w = NF4Weight.from_float(torch.randn(n, k) * 0.05, blocksize)
    wd64, wd32 = w.dequantize(torch.float64), w.dequantize(torch.float32)
    for m in range(1, 9):
        x, dy, bias = torch.randn(m, k), torch.randn(m, n), torch.randn(n)
        y, dx = _run(driver, tmp_path, x, dy, bias, w)
        assert_close_to_ref(y, F.linear(x.double(), wd64, bias.double()), F.linear(x, wd32, bias),
                            tiny=ERROR_FLOOR, what=f"y M={m} W{tuple(w.shape)}")
        if m <= 4:
            assert_close_to_ref(dx, dy.double() @ wd64, dy @ wd32, tiny=ERROR_FLOOR, what=f"dx M={m} W{tuple(w.shape)}")
