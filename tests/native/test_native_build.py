"""The lazy builder (fastpeft._native): build folder, clear errors, no-compiler import, CUDA compile-and-link.

The CUDA test builds the CUDA extension from scratch in a fresh folder (nvcc,
sm_80 + sm_90) and imports it; no GPU is needed for that, only for launches.
It takes minutes on a busy 2-core machine and is marked slow (still run by CI).
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastpeft import _native

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, env_extra: dict, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_build_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(_native.ENV_BUILD_DIR, str(tmp_path / "here"))
    d = _native.build_dir("cpu")
    assert d.parent == tmp_path / "here" and d.is_dir() and d.name.startswith("cpu-torch")
    monkeypatch.delenv(_native.ENV_BUILD_DIR)
    assert _native.build_root() == Path.home() / ".cache" / "fastpeft" / "native"


def test_sources_are_found_in_the_checkout():
    assert all(Path(p).is_file() for p in _native.cpu_sources() + _native.cuda_sources())
    assert any(p.endswith(".cu") for p in _native.cuda_sources())


def test_cpu_extension_loads_and_names_missing_ops():
    assert _native.available()
    assert _native.op("nf4_matmul") is torch.ops.fastpeft_native.nf4_matmul
    with pytest.raises(RuntimeError, match="no_such_op"):
        _native.op("no_such_op")


def test_load_cuda_without_cuda_needs_force():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: load_cuda() builds without force")
    with pytest.raises(RuntimeError, match="CUDA"):
        _native.load_cuda()


def test_without_a_compiler_the_package_imports_and_errors_name_the_op(tmp_path):
    code = """
        import fastpeft, fastpeft.quant
        from fastpeft import _native
        from fastpeft.quant import NF4Weight
        import torch
        w = NF4Weight.from_float(torch.randn(4, 64))   # the pure-torch format needs no compiler
        assert not _native.available()
        try:
            _native.op("nf4_matmul")
        except RuntimeError as e:
            assert "nf4_matmul" in str(e), str(e)
            print("RAISED")
    """
    r = _run(code, {"FASTPEFT_BUILD_DIR": str(tmp_path), "CXX": "/bin/false"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RAISED" in r.stdout


@pytest.mark.slow
def test_cuda_extension_compiles_links_and_imports(tmp_path):
    cuobjdump = shutil.which("cuobjdump") or next(
        iter(Path(sys.prefix).glob("lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump")), None)
    code = """
        import glob, torch
        from fastpeft import _native
        _native.load_cuda(force=True)
        for op in ("nf4_dequantize", "nf4_matmul", "nf4_matmul_transposed"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key("fastpeft_native::" + op, "CUDA"), op
        print("SO", glob.glob(str(_native.build_dir("cuda") / "*.so"))[0])
    """
    r = _run(code, {"FASTPEFT_BUILD_DIR": str(tmp_path)}, timeout=1500)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    so = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("SO ")][0]
    if cuobjdump is not None:
        listing = subprocess.run([str(cuobjdump), "--list-elf", so], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing
        ptx = subprocess.run([str(cuobjdump), "--list-ptx", so], capture_output=True, text=True).stdout
        assert "sm_90" in ptx, f"no compute_90 PTX for GPUs newer than sm_90: {ptx}"
