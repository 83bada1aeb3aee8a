"""Ahead-of-time kernel report: compile every Triton kernel config for real GPUs, no GPU needed.

``python -m gates.kernel_report [--arch 80 90] [--json PATH] [--check]``

For each ``KernelSpec`` of each kernel module (``gates.aot_spec``:
every public module of ``fastpeft.kernels``, each spec recorded from a launch
its launchers really make) and each arch, ``triton.compile`` produces PTX and
a cubin. From them:

- registers, stack and static shared memory: ``cuobjdump -res-usage`` of the
  cubin (triton 3.8 only fills ``n_regs``/``n_spills`` when it loads the cubin
  on a device);
- spill bytes: when the cubin has a stack frame, the bundled ``ptxas -v``
  replayed on the PTX with the flags triton's own ptxas call uses (so it
  allocates the same registers); no stack frame means no spills;
- shared memory: ``metadata.shared`` (the dynamic shared memory the launch
  asks for) plus the static shared memory of the cubin;
- tensor-core instructions: ``cuobjdump -sass`` of the cubin, looking for
  ``HGMMA`` (sm_90 wgmma) and ``HMMA`` (mma.sync);
- global loads: the widest global load in the SASS (``LDG.E.128`` -> 128
  bits; ``LDGSTS``, the ``cp.async`` copy into shared memory, counts too) and
  the number of asynchronous copies (``LDGSTS`` and sm_90's TMA ``UTMALDG``):
  narrow, synchronous loads are what a vectorisation or pipelining regression
  looks like;
- ``wgmma_async``: on sm_90, whether the main wgmma loop (the loop with the
  most wgmmas) keeps a group in flight (one of its ``WARPGROUP.DEPBAR.LE
  gsb0`` waits leaves a count above 0) rather than waiting for every wgmma;
- ``ctas_per_sm``: resident CTAs per SM from registers (allocated per warp in
  units of 256), shared memory (plus 1 KB reserved per CTA) and threads;
- the main loop (``gates.sass_loops``: the largest innermost loop
  of the SASS): ``loop_instructions``, its instruction count, and
  ``loop_byte_loads``, its 8-bit global loads (what a weight stream must not
  be made of: the NF4 kernels' tests require 0);
- ``grid_ctas`` and ``waves``: the first recorded launch's grid and how many
  waves of ``ctas_per_sm x SMs`` it takes (``SM_COUNT``: A100 108, H100 132);
- the grid gate: every launch of the variant marked as a benchmark headline
  shape (``launch_label(..., headline=True)``) must fill the GPU, a grid of at
  least one CTA per SM (``headline_ctas``: the smallest such grid, 0 when the
  variant has no headline launch).

The compile must not go through the Triton interpreter. When this process has
``TRITON_INTERPRET=1`` (as the test suite does), ``compile_report`` runs the
report in a child Python without it and reads back its JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastpeft.kernels._common import TARGET_SMS

from . import sass_loops
from .aot_spec import uninterpreted_environment

# Largest dynamic shared memory one block may use (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Shared memory per SM (bytes), registers per SM, threads per SM, CTAs per SM: A100 / H100.
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
SM_REGISTERS = 65536
SM_THREADS = 2048
SM_CTAS = 32
MAX_REGISTERS = 255
# SMs of the GPU each arch is judged for: A100 (sm_80) 108, H100 SXM (sm_90) the launch plans' target.
SM_COUNT = {80: 108, 90: TARGET_SMS}


GRID_BELOW_SMS = "headline grid below one CTA per SM"
SYNCHRONOUS_WGMMA = "wgmma main loop waits for every wgmma"

# Kernels whose main wgmma loop triton 3.8 does not keep asynchronous on sm_90, and why. The gate holds for
# every other kernel; the list may only shrink (a listed kernel whose loops all overlap fails the ratchet test
# in tests/gates/test_kernel_report.py).
KNOWN_SYNCHRONOUS_WGMMA = {
    "prefix_attention_fwd": "FlashAttention-2 loop: each wgmma result feeds the same iteration's softmax; "
                            "overlap needs warp specialisation, which triton 3.8 does not compile for sm_90",
    "prefix_attention_dkdv": "same loop shape as the forward (P = QKᵀ feeds dV and dS in the iteration)",
    "prefix_attention_dq": "same loop shape as the forward",
    "lora_shrink": "with dropout and the 64-wide rank tile (r > 16) the x tile (an operand) is masked in registers "
                   "every step; the dh = dy B shrink for r % 16 != 0 (no divisibility hint on R) waits too",
    "lora_reduce": "with dropout the x tile (an operand) is masked in registers every step; for r % 16 != 0 (no "
                   "divisibility hint on R) the dA and dB reductions wait too",
    "adapter_forward": "the activation of the down-projection feeds the up-projection's wgmma from registers",
    "adapter_backward_rows": "act'(pre) and the dropout mask are applied to an operand in registers",
    "adapter_reduce": "the recomputed activation is an operand built in registers every step",
}


# Kernels whose launch at a benchmark headline shape (launch_label(..., headline=True)) has fewer CTAs than the
# GPU has SMs, and why. Every kernel module marks the GPU benchmark's shapes. The list may only shrink (a listed
# kernel that fills the GPU everywhere fails the ratchet test in tests/gates/test_kernel_report.py).
KNOWN_SMALL_GRID: dict[str, str] = {
    "nf4_matmul_t": "QLoRA's dX at decode sizes (M = 1, 16): one 64-token tile of rows times K / 64 = 64 column "
                    "tiles at K = 4096, under one CTA per SM; the fix is a split over N with a deterministic "
                    "partial sum, as the LoRA shrink does",
    "adapter_down": "the one-token / 512-token down-projection: one program per 64-row tile and bottleneck tile "
                    "(3 at H = 768, one token); needs a split over H like the LoRA shrink",
    "adapter_forward": "one program per row tile and 64-wide hidden tile: H / 64 = 12 (H = 768) or 64 (H = 4096) "
                       "column tiles, 128 programs even at 4096 tokens and H = 4096; smaller tiles or a split wanted",
    "adapter_backward_rows": "one program per row tile (one at one token): the bottleneck stays on chip per row "
                             "tile; small M needs a split over H",
    "adapter_reduce": "one program per hidden tile and bottleneck tile (12 at H = 768); the M-split the LoRA "
                      "reductions use is not there yet",
    "prefix_attention_fwd": "a decode step (one query, batch 1): one program per query head, 32; needs the "
                            "keys split across programs with an LSE merge (flash-decoding)",
    "prefix_attention_dq": "as the forward: one program per query head at one query",
    "prefix_attention_delta": "rowsum(dO * O) at one query: one program per head (a trivial kernel)",
}


# TF32 variants (gates/tf32.py: fp32 launches with torch's TF32 setting on) that fail one check of the gate under
# triton 3.8, by (name prefix, arch): the problem exempted (its text's start) and why. Only that problem of those
# variants is exempt; the list may only shrink (tests/gates/test_tf32_report.py fails on an entry that no longer
# shows).
KNOWN_TF32: dict[tuple[str, int], tuple[str, str]] = {
    ("nf4_matmul[tf32", 90): (SYNCHRONOUS_WGMMA,
                              "at TF32 the dequantized weight, wgmma's register operand, is an fp32 tile converted "
                              "to tf32 in registers every step, and triton 3.8 waits for each wgmma; fp16/bf16 (the "
                              "QLoRA compute dtypes) stay asynchronous"),
    ("nf4_matmul_t[tf32", 90): (SYNCHRONOUS_WGMMA, "as nf4_matmul: the fp32 weight tile is the register operand"),
    ("prefix_attention_dkdv[tf32,d128", 80): ("spills", "fp32 Q/K/V tiles at d = 128 on sm_80 (mma.sync): the "
                                                        "causal variant spills 12 B; a 16-key block (as the "
                                                        "forward's) spills more at 8 warps, so the fix is a "
                                                        "TF32-specific layout"),
}


@dataclass(frozen=True)
class KernelReportRow:
    """One kernel config compiled for one arch: resources from the cubin, ``problems()`` for the gate."""

    module: str
    name: str
    arch: int
    num_warps: int
    num_stages: int
    is_gemm: bool
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int
    hmma: int
    hgmma: int
    load_bits: int
    async_copies: int
    wgmma_async: bool
    compile_s: float
    grid_ctas: int = 0
    headline_ctas: int = 0
    headline_label: str = ""
    loop_instructions: int = 0
    loop_byte_loads: int = 0

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def tensor_core(self) -> str:
        """``HGMMA`` (wgmma), ``HMMA`` (mma.sync) or ``none``."""
        return "HGMMA" if self.hgmma else "HMMA" if self.hmma else "none"

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.arch]

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs per SM allowed by registers, shared memory and threads."""
        threads = 32 * self.num_warps
        registers_per_warp = -(-self.registers * 32 // 256) * 256
        by_registers = SM_REGISTERS // max(registers_per_warp * self.num_warps, 1)
        by_shared = SM_SHARED[self.arch] // (self.shared_bytes + 1024)
        return min(by_registers, by_shared, SM_THREADS // threads, SM_CTAS)

    @property
    def sm_count(self) -> int:
        return SM_COUNT[self.arch]

    @property
    def waves(self) -> float:
        """Waves of the first recorded launch's grid: CTAs / (CTAs per SM x SMs); 0 when no grid was recorded."""
        resident = self.ctas_per_sm * self.sm_count
        return self.grid_ctas / resident if resident and self.grid_ctas else 0.0

    def gate_problems(self) -> list[str]:
        """``problems()`` less those the known-exemption lists above allow for this kernel (what ``--check`` fails)."""
        kernel = self.name.split("[", 1)[0]
        out = self.problems()
        if kernel in KNOWN_SYNCHRONOUS_WGMMA:
            out = [p for p in out if p != SYNCHRONOUS_WGMMA]
        if kernel in KNOWN_SMALL_GRID:
            out = [p for p in out if not p.startswith(GRID_BELOW_SMS)]
        for problem in known_tf32_problems(self.name, self.arch):
            out = [p for p in out if not p.startswith(problem)]
        return out

    def problems(self) -> list[str]:
        """What fails the gate: spills, > 255 registers, too much shared memory, a GEMM without tensor cores,
        a headline launch whose grid leaves SMs idle."""
        out = []
        if self.spills:
            out.append(f"spills {self.spill_store_bytes}B stores / {self.spill_load_bytes}B loads")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared {self.shared_bytes}B > {self.shared_limit}B")
        if self.is_gemm and self.tensor_core == "none":
            out.append("no tensor-core instructions")
        if self.hgmma and not self.wgmma_async:
            out.append(SYNCHRONOUS_WGMMA)
        if self.ctas_per_sm < 1:
            out.append("does not fit on an SM")
        if self.headline_ctas and self.headline_ctas < self.sm_count:
            out.append(f"{GRID_BELOW_SMS} ({self.headline_ctas} < {self.sm_count} at {self.headline_label})")
        return out


def known_tf32_problems(name: str, arch: int) -> list[str]:
    """The problems ``KNOWN_TF32`` exempts for variant ``name`` on ``sm_<arch>``."""
    return [problem for (prefix, a), (problem, _) in KNOWN_TF32.items() if a == arch and name.startswith(prefix)]


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas_spills(ptx: str, fp_fusion: bool) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from ``ptxas -v``, run with the flags triton's own call uses."""
    gpu = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2"] + ([] if fp_fusion else ["--fmad=false"])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([_tool("ptxas"), *flags, f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stdout + done.stderr)
    return int(spills.group(1)), int(spills.group(2))


# A global load's opcode and all its modifiers (``LDGSTS.E.BYPASS.LTC128B.128``: the width is the last
# modifier that names one; ``LTC128B`` is an L2 prefetch hint, not a width).
_LOAD = re.compile(r"\b(?:LDG|LDGSTS)((?:\.[A-Z0-9_]+)+)")
_LOAD_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _load_bits(modifiers: str) -> int:
    widths = [_LOAD_BITS[m] for m in modifiers.split(".") if m in _LOAD_BITS]
    return widths[-1] if widths else 32


def _load_widths(sass: str) -> tuple[int, int]:
    """(widest global load in bits, number of asynchronous copies) of the SASS text."""
    widths = [_load_bits(m.group(1)) for m in _LOAD.finditer(sass)]
    asynchronous = len(re.findall(r"\bLDGSTS\.", sass)) + len(re.findall(r"\bUTMALDG\b", sass))
    return (max(widths) if widths else 0), asynchronous


def _wgmma_async(sass: str) -> bool:
    """Whether the main wgmma loop keeps a wgmma group in flight (True when no loop issues wgmma).

    The main wgmma loop is the loop (``sass_loops.loops``) with the most
    ``HGMMA`` instructions. It is asynchronous when one of its
    ``WARPGROUP.DEPBAR.LE gsb0`` waits leaves a group in flight (a count above
    0); a kernel whose wgmmas run outside any loop (one product per program)
    has nothing to overlap.
    """
    best, best_count = None, 0
    for loop in sass_loops.loops(sass):
        count = loop.opcodes()["HGMMA"]
        if count and count >= best_count:
            best, best_count = loop.body, count
    if best is None:
        return True
    waits = [int(n, 16) for text in best for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x([0-9a-f]+)", text)]
    return any(n > 0 for n in waits)


def _main_loop(sass: str) -> tuple[int, int]:
    """(instructions, 8-bit global loads) of the largest innermost loop; (0, 0) without a loop."""
    loop = sass_loops.main_loop(sass)
    if loop is None:
        return 0, 0
    byte_loads = sum(1 for text in loop.body for m in _LOAD.finditer(text) if _load_bits(m.group(1)) == 8)
    return loop.instructions, byte_loads


def _cubin_usage(cubin: bytes) -> tuple:
    """(registers, stack bytes, static shared bytes, HMMA count, HGMMA count, load bits, async copies,
    wgmma kept in flight, main-loop instructions, main-loop byte loads)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", text))
    return (int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"]),
            len(re.findall(r"\bHMMA\.", text)), len(re.findall(r"\bHGMMA\.", text)), *_load_widths(text),
            _wgmma_async(text), *_main_loop(text))


def compile_spec(spec, arch: int, module: str = "") -> KernelReportRow:
    """Compile one ``KernelSpec`` for ``sm_<arch>`` and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    source = ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    (registers, stack, static_shared, hmma, hgmma, load_bits, async_copies, wgmma_async, loop_instructions,
     loop_byte_loads) = _cubin_usage(kernel.asm["cubin"])
    # Spills live in the stack frame: without one there is nothing to count.
    spill_st, spill_ld = _ptxas_spills(kernel.asm["ptx"], kernel.metadata.enable_fp_fusion) if stack else (0, 0)
    headline_label, headline_ctas = min(getattr(spec, "headline_grids", ()) or [("", 0)], key=lambda h: h[1])
    return KernelReportRow(module, spec.name, arch, spec.num_warps, spec.num_stages, spec.is_gemm, registers,
                           spill_st, spill_ld, stack, kernel.metadata.shared + static_shared, hmma, hgmma,
                           load_bits, async_copies, wgmma_async, round(time.perf_counter() - start, 3),
                           getattr(spec, "grid_ctas", 0), headline_ctas, headline_label, loop_instructions,
                           loop_byte_loads)


def _compile_one(job: tuple[str, int, int]) -> dict:
    """Compile spec ``index`` of ``module`` for ``arch`` (runs in a worker process)."""
    from .aot_spec import module_specs

    module, index, arch = job
    return dataclasses.asdict(compile_spec(module_specs(module)[index], arch, module))


def _jobs(arches, modules) -> list[tuple[str, int, int]]:
    from .aot_spec import module_specs

    jobs = []
    for module in modules:
        count = len(module_specs(module))
        jobs += [(module, index, arch) for index in range(count) for arch in arches]
    return jobs


def _default_modules() -> tuple[str, ...]:
    from .aot_spec import kernel_modules

    return kernel_modules()


def compile_report(arches=(80, 90), modules=None, workers=None) -> list[KernelReportRow]:
    """One row per (kernel variant, arch) of every module in ``modules`` (default: all kernel modules)."""
    arches = tuple(int(a) for a in arches)
    for arch in arches:
        if arch not in SHARED_LIMIT:
            raise ValueError(f"arches: {arch} is not supported; use any of {sorted(SHARED_LIMIT)}")
    modules = tuple(modules) if modules is not None else _default_modules()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _report_in_child(arches, modules, workers)
    jobs = _jobs(arches, modules)
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [KernelReportRow(**_compile_one(job)) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [KernelReportRow(**row) for row in pool.map(_compile_one, jobs)]


def _report_in_child(arches, modules, workers) -> list[KernelReportRow]:
    env = uninterpreted_environment()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "gates.kernel_report", "--quiet", "--json", str(out),
               "--arch", *map(str, arches), "--modules", *modules]
        if workers:
            cmd += ["--workers", str(workers)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"kernel report subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return [row_from_json(row) for row in json.loads(out.read_text())["rows"]]


def row_from_json(row: dict) -> KernelReportRow:
    """A row written by ``--json`` (which adds derived columns such as ``ctas_per_sm``)."""
    names = {f.name for f in dataclasses.fields(KernelReportRow)}
    return KernelReportRow(**{k: v for k, v in row.items() if k in names})


def format_table(rows: list[KernelReportRow]) -> str:
    header = ("kernel", "arch", "warps", "stages", "regs", "spill B", "shared B", "CTAs/SM", "grid (waves)",
              "tensor core", "loads", "main loop", "compile s", "gate")
    lines = [header]
    for r in rows:
        grid = f"{r.grid_ctas} ({r.waves:.2f})" + ("*" if r.headline_ctas else "") if r.grid_ctas else "-"
        lines.append((r.name, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages), str(r.registers), str(r.spills),
                      str(r.shared_bytes), str(r.ctas_per_sm), grid,
                      f"{r.tensor_core} ({r.hgmma or r.hmma}{', async' if r.wgmma_async else ''})"
                      if r.tensor_core != "none" else "none", f"{r.load_bits}b" + (f" async {r.async_copies}" if r.async_copies else ""),
                      f"{r.loop_instructions}" + (f" ({r.loop_byte_loads} byte loads)" if r.loop_byte_loads else ""),
                      f"{r.compile_s:.2f}", _gate_cell(r)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _gate_cell(row: KernelReportRow) -> str:
    known = [p for p in row.problems() if p not in row.gate_problems()]
    return "; ".join(row.gate_problems() + [f"{p} (known)" for p in known]) or "ok"


def summary(rows: list[KernelReportRow]) -> str:
    """One line: compiles, rows failing the gate, headline launches checked by the grid gate and those below it."""
    headline = [r for r in rows if r.headline_ctas]
    small = [r for r in headline if GRID_BELOW_SMS in "; ".join(r.problems())]
    failed = [r for r in rows if r.gate_problems()]
    return (f"{len(rows)} compiles, {len(failed)} failing the gate; grid gate: {len(headline)} headline rows, "
            f"{len(small)} with fewer CTAs than SMs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gates.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                        help="SM versions")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--modules", nargs="+", help="kernel modules (default: every public module of fastpeft.kernels)")
    parser.add_argument("--workers", type=int, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any row fails the gate")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compile_report(args.arch, args.modules, args.workers)
    wall = time.perf_counter() - start
    if args.json:
        args.json.write_text(json.dumps({"wall_s": round(wall, 2),
                                         "rows": [dataclasses.asdict(r) | {"ctas_per_sm": r.ctas_per_sm,
                                                                           "waves": round(r.waves, 3)}
                                                  for r in rows]}, indent=1))
    if not args.quiet:
        print(format_table(rows))
        print(f"\n{len(rows)} compiles in {wall:.1f} s wall")
        print(summary(rows))
    failed = [r for r in rows if r.gate_problems()]
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
