"""The fused AMX kernels (csrc/cpu/nf4_amx.cpp) compile into real AMX code on any x86-64 machine.

Only a CPU with AMX-BF16 runs them (tests/native/test_nf4_cpu_bf16.py does, where
it can); everywhere else the extension builds the stubs, so a change that
breaks the AMX code would pass. Here the source is compiled for Sapphire Rapids
(``-march=sapphirerapids``, no run) and the object must hold the tile
instructions, which the stubs do not.
"""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AMX is x86-64 only")
def test_amx_kernels_compile_to_tile_instructions(tmp_path):
    compiler, objdump = shutil.which("g++") or shutil.which("c++"), shutil.which("objdump")
    assert compiler and objdump, "needs a C++ compiler and objdump (the native extension needs the compiler too)"
    obj = tmp_path / "nf4_amx.o"
    build = subprocess.run(
        [compiler, "-c", "-O2", "-march=sapphirerapids", "-fopenmp", "-std=c++17",
         *(f"-I{p}" for p in include_paths()), f"-I{REPO / 'csrc' / 'include'}", f"-I{REPO / 'csrc'}",
         str(REPO / "csrc" / "cpu" / "nf4_amx.cpp"), "-o", str(obj)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    disassembly = subprocess.run([objdump, "-d", str(obj)], capture_output=True, text=True, timeout=60).stdout
    for instruction in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored"):
        assert instruction in disassembly, f"no {instruction} in the AMX build of nf4_amx.cpp"
