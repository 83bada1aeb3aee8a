"""Every CPU-specific path, forced and tested on whichever x86-64 machine runs the suite.

Intel and AMD machines, with or without AVX-512, AVX512-BF16 or AMX, run
different code: fastpeft's native kernels (compiled ``-march=native``) and
torch's own (ATen's vectorised reductions, oneDNN's and MKL's GEMMs). A test
that passes on one can fail on another (it did: the adapter's learned-scale
gradient on an AMD EPYC). So the CPU numerics tests run again here, once per
level this machine can run below its own (``FASTPEFT_CPU_ISA``, see
``fastpeft._native.cpu_isa``), each in a fresh process that forces the level on
fastpeft's extension and on torch's libraries. The process checks that it really
runs at that level before it runs the tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpeft._native import cpu_isa

REPO = Path(__file__).resolve().parents[2]

# The tests whose code or tolerances depend on the CPU: the native NF4 and prefix-attention kernels, torch's
# reductions and GEMMs under the adapter/LoRA CPU paths, oneDNN's bf16.
CPU_NUMERICS_TESTS = (
    "tests/native/test_nf4_cpu_gemv.py",
    "tests/native/test_nf4_cpu_matmul.py",
    "tests/native/test_nf4_cpu_bf16.py",
    "tests/ops/test_prefix_attention_cpu.py",
    "tests/ops/test_prefix_attention_nonfinite.py",  # the C++ kernel's NaN handling differs per instruction set
    "tests/ops/test_cpu_bf16_path.py",
    "tests/ops/test_lora_cpu_paths.py",
    "tests/nn/test_adapter_module.py",
)

_CHECK_LEVEL = (
    "import os, torch; from fastpeft._native import cpu_isa; "
    "level = cpu_isa.selected_level(); cap = torch.backends.cpu.get_cpu_capability(); "
    "want = {'avx512': 'AVX512', 'avx2': 'AVX2', 'baseline': 'DEFAULT'}[level.name]; "
    "assert cap == want, (cap, want); print(level.name, level.march, cap)"
)


def _run_forced(level: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **cpu_isa.forced_environment(level)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_levels_and_their_errors(monkeypatch):
    assert set(cpu_isa.LEVELS) == {"native", "avx512", "avx2", "baseline"}
    monkeypatch.setenv(cpu_isa.ENV_ISA, "avx1024")
    with pytest.raises(ValueError, match="FASTPEFT_CPU_ISA='avx1024'"):
        cpu_isa.selected_level()
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    with pytest.raises(RuntimeError, match="lacks avx512f"):
        cpu_isa.check_runnable(cpu_isa.LEVELS["avx512"])
    monkeypatch.setenv(cpu_isa.ENV_AMX, "0")
    assert not cpu_isa.amx_allowed()


def test_amx_can_be_kept_off(monkeypatch):
    from fastpeft.cpu import nf4_native

    monkeypatch.setenv(cpu_isa.ENV_AMX, "0")
    assert not nf4_native.amx_available()
    assert nf4_native.bf16_forward_kernel(torch.zeros(nf4_native.BF16_AMX_MIN_ROWS + 8, 64).bfloat16()) != \
        "nf4_matmul_bf16_amx"


def test_a_forced_level_builds_apart_from_native(monkeypatch, tmp_path):
    from fastpeft import _native

    monkeypatch.setenv(_native.ENV_BUILD_DIR, str(tmp_path))
    native = _native.build_dir("cpu")
    monkeypatch.setenv(cpu_isa.ENV_ISA, "baseline")
    assert _native.build_dir("cpu") == native.with_name(native.name + "-baseline")


@pytest.mark.skipif(not cpu_isa.runnable_levels(), reason="not an x86-64 machine: no level to force")
@pytest.mark.parametrize("level", ["avx512", "avx2", "baseline"])
def test_cpu_numerics_at_a_forced_level(level):
    if level not in cpu_isa.runnable_levels():
        pytest.skip(f"this CPU cannot run {level}")
    check = _run_forced(level, "-c", _CHECK_LEVEL, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    run = _run_forced(level, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "not triton",
                      *CPU_NUMERICS_TESTS,
                      timeout=1500)
    assert run.returncode == 0, f"{check.stdout.strip()}:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
