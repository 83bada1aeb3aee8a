"""The top-level CMakeLists.txt builds the CPU library, and fastpeft runs it (FASTPEFT_NATIVE_PREBUILT).

Opt-in (about a minute of compiling on 2 cores, the same sources the default
ninja build already compiles): set FASTPEFT_TEST_CMAKE=1.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FASTPEFT_TEST_CMAKE") != "1", reason="opt-in: set FASTPEFT_TEST_CMAKE=1"),
]


def test_cmake_cpu_build_loads_and_matches_reference(tmp_path):
    cmake = shutil.which("cmake")
    assert cmake is not None, "cmake is not installed"
    build = tmp_path / "build"
    configure = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run([cmake, "--build", str(build), "-j2"], capture_output=True, text=True, timeout=1200)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    assert (build / "libfastpeft_native_cpu.so").is_file()

    code = textwrap.dedent("""
        import torch
        from fastpeft.cpu import nf4_native
        from fastpeft.quant.nf4 import NF4Weight
        torch.manual_seed(0)
        w = NF4Weight.from_float(torch.randn(33, 256))
        x = torch.randn(3, 256)
        ref = x.double() @ w.dequantize(torch.float64).T
        err = float((nf4_native.nf4_matmul(x, w).double() - ref).norm() / ref.norm())
        assert err < 1e-6, err
        assert nf4_native.quantize(torch.randn(8, 64)).packed.shape == (256, 1)
        print("OK")
    """)
    env = {**os.environ, "FASTPEFT_NATIVE_PREBUILT": str(build), "FASTPEFT_BUILD_DIR": str(tmp_path / "unused")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    assert not (tmp_path / "unused").exists() or not any((tmp_path / "unused").rglob("*.so"))
