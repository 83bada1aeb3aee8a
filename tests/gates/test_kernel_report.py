"""The ahead-of-time kernel report as a gate for every Triton kernel (sm_80 and sm_90, no GPU needed).

Every variant the launchers run (``gates.aot_spec``) must compile
without spills, within 255 registers and the arch's shared-memory limit, and
every GEMM-shaped variant must contain tensor-core instructions (HMMA, or
HGMMA on sm_90). The report also says how wide the global loads are and
whether operands arrive by asynchronous copies.
"""
import json
import subprocess
import sys

import pytest

from gates.aot_spec import kernel_modules, uninterpreted_environment
from gates.kernel_report import (GRID_BELOW_SMS, KNOWN_SMALL_GRID, KNOWN_SYNCHRONOUS_WGMMA, SHARED_LIMIT,
                                         SM_COUNT, KernelReportRow, _load_widths, compile_report,
                                         known_tf32_problems, summary)

pytestmark = pytest.mark.slow

ARCHES = (80, 90)
NO_INTERPRETER = uninterpreted_environment()


def _rows(rows, module):
    return [r for r in rows if r.module == f"fastpeft.kernels.{module}"]


def test_every_kernel_module_is_reported_for_every_arch(report_rows):
    assert {r.module for r in report_rows} == set(kernel_modules())
    for module in kernel_modules():
        names = {r.name for r in report_rows if r.module == module}
        assert names, f"{module} reports no kernel"
        for arch in ARCHES:
            assert sorted(r.name for r in report_rows if r.module == module and r.arch == arch) == sorted(names)


def _kernel(row) -> str:
    return row.name.split("[", 1)[0]


def test_every_variant_passes_the_gate(report_rows):
    bad = []
    for r in report_rows:
        problems = r.gate_problems()
        if problems:
            bad.append(f"{r.name} sm_{r.arch}: {', '.join(problems)}")
    assert not bad, "\n".join(bad)
    assert all(r.registers > 0 for r in report_rows)
    assert not any(r.hgmma for r in report_rows if r.arch == 80), "HGMMA cannot exist on sm_80"


def test_known_synchronous_wgmma_kernels_are_still_synchronous(report_rows):
    """The exemption list is a ratchet: a kernel that now overlaps its wgmmas must leave the list."""
    for kernel in KNOWN_SYNCHRONOUS_WGMMA:
        rows = [r for r in report_rows if _kernel(r) == kernel and r.hgmma]
        assert rows, f"{kernel}: no sm_90 wgmma variant"
        assert any(not r.wgmma_async for r in rows), f"{kernel} overlaps its wgmmas now: remove it from the list"


def test_known_small_grid_kernels_still_leave_sms_idle(report_rows):
    """The grid exemption list is a ratchet too."""
    for kernel in KNOWN_SMALL_GRID:
        rows = [r for r in report_rows if _kernel(r) == kernel]
        assert any(GRID_BELOW_SMS in "; ".join(r.problems()) for r in rows), \
            f"{kernel} fills the GPU at every headline launch now: remove it from the list"


def test_lora_headline_launches_are_gated(report_rows):
    """Every LoRA kernel that does the layer's work has headline rows on both arches, all filling the GPU."""
    lora = _rows(report_rows, "lora")
    for arch in ARCHES:
        headline = [r for r in lora if r.arch == arch and r.headline_ctas]
        assert {_kernel(r) for r in headline} == {"lora_shrink", "lora_fused_gemm", "lora_reduce"}
        assert all(r.headline_ctas >= SM_COUNT[arch] and r.grid_ctas > 0 for r in headline)


def test_half_precision_lora_variants_are_gemms_and_default_fp32_ones_are_not(report_rows):
    lora = _rows(report_rows, "lora")
    for r in lora:
        if "mask" in r.name or _kernel(r) == "lora_split_sum":
            assert not r.is_gemm
        elif "fp16" in r.name or "bf16" in r.name or "[tf32" in r.name:  # tf32: gates/tf32.py
            assert r.is_gemm, r.name
        else:  # fp32 follows torch's default: exact "ieee" dots on the FMA units
            assert not r.is_gemm, r.name


def test_every_sm90_wgmma_loop_stays_asynchronous(report_rows):
    wgmma = [r for r in report_rows if r.hgmma and _kernel(r) not in KNOWN_SYNCHRONOUS_WGMMA
             and not known_tf32_problems(r.name, r.arch)]
    assert wgmma
    assert all(r.wgmma_async for r in wgmma), [r.name for r in wgmma if not r.wgmma_async]


def test_large_tiles_use_wgmma_and_async_copies_on_sm90(report_rows):
    for module, name in (("lora", "lora_fused_gemm[fp16,r16,m2048,fwd]"), ("nf4", "nf4_matmul[bf16,m2048,fwd]")):
        row = next(r for r in _rows(report_rows, module) if r.name == name and r.arch == 90)
        assert row.hgmma > 0, f"{name}: no wgmma"
        assert row.load_bits == 128 and row.async_copies > 0, f"{name}: {row.load_bits}-bit loads, " \
                                                              f"{row.async_copies} async copies"
    lora = next(r for r in report_rows if r.name == "lora_fused_gemm[fp16,r16,m2048,fwd]" and r.arch == 90)
    assert lora.wgmma_async


def test_nf4_rows_describe_the_variant_that_runs(report_rows):
    """The NF4 variants carry Triton's divisibility hints (as at run time): 128-bit pipelined operand loads."""
    nf4 = [r for r in _rows(report_rows, "nf4") if r.is_gemm]
    assert nf4
    assert all(r.load_bits == 128 and r.async_copies > 0 for r in nf4), [
        (r.name, r.arch, r.load_bits, r.async_copies) for r in nf4 if r.load_bits != 128 or not r.async_copies]


def _row(**changes):
    base = dict(module="m", name="k", arch=80, num_warps=4, num_stages=3, is_gemm=True, registers=128,
                spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0, shared_bytes=1024, hmma=8, hgmma=0,
                load_bits=128, async_copies=4, wgmma_async=False, compile_s=0.1)
    return KernelReportRow(**{**base, **changes})


def test_gate_flags_each_problem():
    assert SHARED_LIMIT == {80: 163 * 1024, 90: 227 * 1024}
    assert _row().problems() == []
    assert _row(spill_store_bytes=8).problems()[0].startswith("spills")
    assert _row(registers=256).problems() == ["256 registers"]
    assert _row(arch=80, shared_bytes=163 * 1024 + 1).problems()[0].startswith("shared")
    assert _row(arch=90, shared_bytes=163 * 1024 + 1).problems() == []
    assert _row(hmma=0).problems() == ["no tensor-core instructions"]
    assert _row(hmma=0, is_gemm=False).problems() == []
    assert _row(hgmma=4, hmma=0, arch=90).tensor_core == "HGMMA"
    assert _row(hgmma=4, hmma=0, arch=90, wgmma_async=False).problems() == ["wgmma main loop waits for every wgmma"]
    assert _row(hgmma=4, hmma=0, arch=90, wgmma_async=True).problems() == []
    assert _row(arch=90, shared_bytes=230 * 1024).problems()[-1] == "does not fit on an SM"


def test_check_applies_the_known_exemptions_to_the_listed_kernels_only(monkeypatch):
    from gates import kernel_report

    waits = dict(hgmma=4, hmma=0, arch=90, wgmma_async=False)
    listed = _row(name="lora_shrink[fp16,r8,m1,fwd]", **waits)
    assert listed.problems() == ["wgmma main loop waits for every wgmma"] and listed.gate_problems() == []
    assert kernel_report._gate_cell(listed) == "wgmma main loop waits for every wgmma (known)"
    other = _row(name="lora_fused_gemm[fp16,r8,m1,fwd]", **waits)
    assert other.gate_problems() == other.problems() != []
    spilling = _row(name="lora_shrink[fp16,r8,m1,fwd]", spill_store_bytes=8, **waits)
    assert spilling.gate_problems()[0].startswith("spills")  # an exemption covers one problem, not the row
    small = _row(name="k[x]", grid_ctas=64, headline_ctas=64, headline_label="bf16,m1,fwd", arch=90)
    monkeypatch.setitem(kernel_report.KNOWN_SMALL_GRID, "k", "test")
    assert small.problems() and small.gate_problems() == []
    monkeypatch.setattr(kernel_report, "compile_report", lambda *a, **k: [listed])
    assert kernel_report.main(["--check"]) == 0
    monkeypatch.setattr(kernel_report, "compile_report", lambda *a, **k: [other])
    assert kernel_report.main(["--check"]) == 1


def test_grid_gate_fails_a_headline_launch_below_one_cta_per_sm():
    assert SM_COUNT == {80: 108, 90: 132}
    small = _row(arch=90, grid_ctas=64, headline_ctas=64, headline_label="bf16,m1,fwd")
    assert small.problems() == [f"{GRID_BELOW_SMS} (64 < 132 at bf16,m1,fwd)"]
    assert _row(arch=90, grid_ctas=64, headline_ctas=0).problems() == []  # not a headline launch: reported only
    assert _row(arch=90, headline_ctas=132).problems() == []
    assert _row(arch=80, headline_ctas=108).problems() == []
    assert _row(arch=80, headline_ctas=107).problems()[0].startswith(GRID_BELOW_SMS)
    assert summary([small, _row(), _row(arch=80, headline_ctas=200)]) == (
        "3 compiles, 1 failing the gate; grid gate: 2 headline rows, 1 with fewer CTAs than SMs")


def test_waves():
    # 4 warps x 128 registers: 4 CTAs per SM; 132 SMs hold 528 of them at once.
    row = _row(arch=90, registers=128, shared_bytes=1024, grid_ctas=1056)
    assert row.ctas_per_sm == 4 and row.waves == 2.0
    assert _row(arch=80, registers=128, shared_bytes=1024, grid_ctas=216).waves == 0.5
    assert _row(grid_ctas=0).waves == 0.0


def test_occupancy_estimate():
    # 8 warps x 154 registers: 39424 of 65536 registers -> 1 CTA; 116 registers -> 2 CTAs.
    assert _row(arch=90, num_warps=8, registers=154, shared_bytes=1024).ctas_per_sm == 1
    assert _row(arch=90, num_warps=8, registers=116, shared_bytes=1024).ctas_per_sm == 2
    # shared memory bound: 100 KB + 1 KB reserved per CTA of 228 KB on sm_90, of 164 KB on sm_80
    assert _row(arch=90, num_warps=4, registers=64, shared_bytes=100 * 1024).ctas_per_sm == 2
    assert _row(arch=80, num_warps=4, registers=64, shared_bytes=100 * 1024).ctas_per_sm == 1
    # thread bound: 2048 threads per SM
    assert _row(arch=90, num_warps=1, registers=16, shared_bytes=0).ctas_per_sm == 32
    assert _row(arch=90, num_warps=16, registers=32, shared_bytes=0).ctas_per_sm == 4


def _sass(*instructions):
    return "\n".join(f"        /*{16 * i:04x}*/   {text} ;   /* 0x0 */" for i, text in enumerate(instructions))


def test_wgmma_async_is_read_from_the_main_wgmma_loop():
    from gates.kernel_report import _wgmma_async

    wgmma, wait0, wait1 = "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0", \
        "WARPGROUP.DEPBAR.LE gsb0, 0x1"
    # a prologue loop that waits to 0 (the LoRA rank loop) and a main loop with more wgmmas that keeps one in flight
    prologue_sync_main_async = _sass("NOP", wgmma, wait0, "@!P0 BRA 0x0010", "NOP", wgmma, wgmma, wait1,
                                     "@!P1 BRA 0x0050", wait0, "EXIT")
    assert _wgmma_async(prologue_sync_main_async)
    main_sync = _sass("NOP", wgmma, wgmma, wait0, "@!P1 BRA 0x0010", "EXIT")
    assert not _wgmma_async(main_sync)
    assert _wgmma_async(_sass(wgmma, wait0, "EXIT"))  # one product per program: no loop to overlap
    assert _wgmma_async(_sass("NOP", "BRA 0x0000"))     # no wgmma at all


def test_load_widths_are_read_from_sass():
    sass = ("LDG.E.128 R4, desc[UR6][R2.64] ;\nLDG.E.U16 R9, desc[UR6][R4.64] ;\n"
            "LDGSTS.E.BYPASS.128 [R3], desc[UR8][R6.64] ;\nLDGDEPBAR ;\nLDG.E R1, desc[UR4][R2.64] ;\n")
    assert _load_widths(sass) == (128, 1)
    assert _load_widths("LDG.E.U8 R1, desc[UR4][R2.64] ;\nLDG.E.U16 R1, desc[UR4][R2.64] ;\n") == (16, 0)
    assert _load_widths("UTMALDG.2D [UR8], [UR4] ;\n") == (0, 1)
    # sm_80 cp.async with an L2 prefetch hint: LTC128B is not the width, .128 is
    assert _load_widths("LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR8][R6.64] ;\n") == (128, 1)
    assert _load_widths("LDGSTS.E.LTC128B.64 [R3], desc[UR8][R6.64] ;\nLDG.E.LTC128B R1, desc[UR4][R2.64] ;\n") \
        == (64, 1)


def test_main_loop_instructions_and_byte_loads_are_read_from_the_largest_innermost_loop():
    from gates.kernel_report import _main_loop, row_from_json

    byte, wide = "LDG.E.U8 R9, desc[UR6][R4.64]", "LDG.E.128 R4, desc[UR6][R2.64]"
    # an outer loop around a small inner loop, then the main loop: 3 byte loads + FFMA + branch, NOP not counted
    sass = _sass("NOP", "IADD3 R1, R1, 0x1, RZ", "@P0 BRA 0x0010", byte, "@P1 BRA 0x0000",
                 byte, byte, byte, "NOP", "FFMA R1, R2, R3, R1", "@P2 BRA 0x0050", wide, "EXIT")
    assert _main_loop(sass) == (5, 3)
    assert _main_loop(_sass(wide, "EXIT")) == (0, 0)
    old = {f: 1 for f in ("registers", "spill_store_bytes", "spill_load_bytes", "stack_bytes", "shared_bytes",
                          "hmma", "hgmma", "load_bits", "async_copies", "compile_s")}
    row = row_from_json({**old, "module": "m", "name": "k", "arch": 90, "num_warps": 4, "num_stages": 2,
                         "is_gemm": False, "wgmma_async": True})  # a report written before the loop columns
    assert (row.loop_instructions, row.loop_byte_loads) == (0, 0)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="arches"):
        compile_report((75,))


def test_cli_writes_json_and_check_exit_code(tmp_path, report_rows):
    """The command line (cubins come from the triton cache the fixture filled)."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "gates.kernel_report", "--arch", "80", "--check",
                           "--modules", "fastpeft.kernels.nf4", "--json", str(out)],
                          env=NO_INTERPRETER, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nf4_matmul[fp16,m256,fwd]" in done.stdout and "sm_80" in done.stdout
    assert "failing the gate; grid gate:" in done.stdout
    data = json.loads(out.read_text())
    assert {r["arch"] for r in data["rows"]} == {80}
    assert all(r["grid_ctas"] > 0 and r["waves"] > 0 for r in data["rows"])
    assert sorted(r["name"] for r in data["rows"]) == sorted(
        r.name for r in _rows(report_rows, "nf4") if r.arch == 80)


def test_report_detects_spills_in_a_config_known_to_spill():
    """The gate can fail: a 256x256 forward GEMM tile with the Philox mask added spills on sm_90."""
    code = (
        "import dataclasses\n"
        "from gates.aot import lora\n"
        "from gates.kernel_report import compile_spec\n"
        "spec = next(s for s in lora.aot_specs() if s.name == 'lora_fused_gemm[fp16,r16,m2048,fwd]')\n"
        "spec = dataclasses.replace(spec, constexprs={**spec.constexprs, 'BLOCK_M': 256, 'BLOCK_N': 256, "
        "'DROPOUT': True})\n"
        "row = compile_spec(spec, 90)\n"
        "print(row.spills, row.registers, row.stack_bytes)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=NO_INTERPRETER, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    spills, registers, stack = map(int, done.stdout.split())
    assert spills > 0 and stack > 0 and registers == 255


def test_dropout_code_compiles_away_when_off():
    """DROPOUT=False leaves no Philox in the PTX; DROPOUT=True has its round multiplier 0xD2511F53."""
    code = (
        "from gates.aot import lora\n"
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "for spec in lora.aot_specs():\n"
        "    if spec.name not in ('lora_shrink[fp16,r16,m64,fwd]', 'lora_reduce[fp16,r16,m16,bwd_dropout]'):\n"
        "        continue\n"
        "    for drop in (True, False):\n"
        "        src = ASTSource(spec.fn, spec.signature, dict(spec.constexprs, DROPOUT=drop), spec.attrs)\n"
        "        ptx = triton.compile(src, target=GPUTarget('cuda', 80, 32),\n"
        "                             options={'num_warps': spec.num_warps, 'num_stages': spec.num_stages}).asm['ptx']\n"
        "        found = any(s in ptx.lower() for s in ('-766435501', '3528531795', '0xd2511f53'))\n"
        "        print(spec.name, drop, found)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=NO_INTERPRETER, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.rsplit(" ", 2) for line in done.stdout.splitlines()]
    assert len(lines) == 4
    for name, drop, found in lines:
        assert found == drop, f"{name}: DROPOUT={drop} but Philox found={found}"
