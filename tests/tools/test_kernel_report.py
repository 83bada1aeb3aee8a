"""The ahead-of-time kernel report as a gate for the LoRA kernels (sm_80 and sm_90, no GPU needed).

Every LoRA kernel config must compile without spills, within 255 registers and
the arch's shared-memory limit, and every GEMM-shaped kernel must contain
tensor-core instructions (HMMA, or HGMMA on sm_90). The suite runs with
TRITON_INTERPRET=1, so ``compile_report`` compiles in a child process without
it; the triton cache makes a second run cheap.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from fastpeft.kernels import lora
from fastpeft.tools.kernel_report import SHARED_LIMIT, KernelReportRow, compile_report, format_table

pytestmark = pytest.mark.slow

ARCHES = (80, 90)


@pytest.fixture(scope="module")
def lora_rows():
    start = time.perf_counter()
    rows = compile_report(ARCHES, modules=["fastpeft.kernels.lora"])
    print(f"\n{format_table(rows)}\nLoRA kernel report: {len(rows)} compiles in {time.perf_counter() - start:.1f} s")
    return rows


def test_every_spec_is_compiled_for_every_arch(lora_rows):
    names = [spec.name for spec in lora.aot_specs()]
    assert sorted((r.name, r.arch) for r in lora_rows) == sorted((n, a) for n in names for a in ARCHES)


def test_no_spills_and_registers_within_limit(lora_rows):
    bad = [f"{r.name} sm_{r.arch}: {r.registers} regs, {r.spills} B spilled" for r in lora_rows
           if r.spills or r.registers > 255]
    assert not bad, "\n".join(bad)
    assert all(r.registers > 0 for r in lora_rows)


def test_shared_memory_within_arch_limit(lora_rows):
    assert SHARED_LIMIT == {80: 163 * 1024, 90: 227 * 1024}
    bad = [f"{r.name} sm_{r.arch}: {r.shared_bytes} B" for r in lora_rows if r.shared_bytes > SHARED_LIMIT[r.arch]]
    assert not bad, "\n".join(bad)
    # pipelined GEMMs stage their operand tiles in shared memory
    assert all(r.shared_bytes > 0 for r in lora_rows if r.is_gemm)


def test_gemm_kernels_use_tensor_cores(lora_rows):
    gemms = [r for r in lora_rows if r.is_gemm]
    assert gemms, "no GEMM-shaped specs"
    bad = [f"{r.name} sm_{r.arch}" for r in gemms if r.tensor_core == "none"]
    assert not bad, "no tensor-core instructions in:\n" + "\n".join(bad)
    assert not any(r.hgmma for r in lora_rows if r.arch == 80), "HGMMA cannot exist on sm_80"
    # wgmma is used on sm_90 where a warp group owns >= 64 rows (the large GEMM tiles)
    assert any(r.hgmma for r in gemms if r.arch == 90 and "gemm_m128" in r.name)


def test_half_precision_specs_are_gemms_and_fp32_ieee_specs_are_not(lora_rows):
    for r in lora_rows:
        if "fp16" in r.name or "bf16" in r.name:
            assert r.is_gemm, r.name
        if "fp32" in r.name and not lora.ALLOW_TF32:
            assert not r.is_gemm, r.name


def _row(**changes):
    base = dict(module="m", name="k", arch=80, num_warps=4, num_stages=3, is_gemm=True, registers=128,
                spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0, shared_bytes=1024, hmma=8, hgmma=0,
                compile_s=0.1)
    return KernelReportRow(**{**base, **changes})


def test_gate_flags_each_problem():
    assert _row().problems() == []
    assert _row(spill_store_bytes=8).problems()[0].startswith("spills")
    assert _row(registers=256).problems() == ["256 registers"]
    assert _row(arch=80, shared_bytes=163 * 1024 + 1).problems()[0].startswith("shared")
    assert _row(arch=90, shared_bytes=163 * 1024 + 1).problems() == []
    assert _row(hmma=0).problems() == ["no tensor-core instructions"]
    assert _row(hmma=0, is_gemm=False).problems() == []
    assert _row(hgmma=4, hmma=0, arch=90).tensor_core == "HGMMA"


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="arches"):
        compile_report((75,))


def test_cli_writes_json_and_check_exit_code(tmp_path, lora_rows):
    """The command line (cubins come from the triton cache the fixture filled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "fastpeft.tools.kernel_report", "--arch", "80", "--check",
                           "--modules", "fastpeft.kernels.lora", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lora_fused_gemm[fp16,fwd,gemm_m128]" in done.stdout and "sm_80" in done.stdout
    data = json.loads(out.read_text())
    assert {r["arch"] for r in data["rows"]} == {80}
    assert len(data["rows"]) == len(lora.aot_specs())


def test_report_detects_spills_in_a_config_known_to_spill():
    """The gate can fail: the large forward GEMM tile with the Philox mask added spills on sm_90."""
    code = (
        "import dataclasses\n"
        "from fastpeft.kernels import lora\n"
        "from fastpeft.tools.kernel_report import compile_spec\n"
        "spec = next(s for s in lora.aot_specs() if s.name == 'lora_fused_gemm[fp16,fwd,gemm_m128]')\n"
        "spec = dataclasses.replace(spec, constexprs={**spec.constexprs, 'DROPOUT': True})\n"
        "row = compile_spec(spec, 90)\n"
        "print(row.spills, row.registers, row.stack_bytes)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    spills, registers, stack = map(int, done.stdout.split())
    assert spills > 0 and stack > 0 and registers == 255


def test_dropout_code_compiles_away_when_off():
    """DROPOUT=False leaves no Philox in the PTX; DROPOUT=True has its round multiplier 0xD2511F53."""
    code = (
        "from fastpeft.kernels import lora\n"
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "for spec in lora.aot_specs():\n"
        "    if spec.name not in ('lora_shrink[fp16,x,shrink_m64,r16]', 'lora_reduce[fp16,dA,reduce,r16]'):\n"
        "        continue\n"
        "    for drop in (True, False):\n"
        "        src = ASTSource(spec.fn, spec.signature, dict(spec.constexprs, DROPOUT=drop), spec.attrs)\n"
        "        ptx = triton.compile(src, target=GPUTarget('cuda', 80, 32),\n"
        "                             options={'num_warps': spec.num_warps, 'num_stages': spec.num_stages}).asm['ptx']\n"
        "        found = any(s in ptx.lower() for s in ('-766435501', '3528531795', '0xd2511f53'))\n"
        "        print(spec.name, drop, found)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.rsplit(" ", 2) for line in done.stdout.splitlines()]
    assert len(lines) == 4
    for name, drop, found in lines:
        assert found == drop, f"{name}: DROPOUT={drop} but Philox found={found}"
