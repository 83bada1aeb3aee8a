"""Static int64-offset check: no memory address is built from an int32 product that can pass 2**31.

``python -m gates.offset_check [--modules M ...] [--json PATH]`` (exit 1 on a finding)

Triton computes ``offs_m * stride_xm`` in int32 when both factors are int32,
so it wraps once ``M · stride`` reaches 2**31 (75k tokens x 28672 columns)
and the kernel reads or writes the wrong memory. ``docs/architecture.md``
("indexing") requires such products to be widened to int64 first.

How it checks, without a GPU: every variant the kernel modules launch
(``aot_spec``: each module's ``aot_launches``) is lowered to Triton IR (TTIR,
after Triton's own canonicalisation; a fraction of a second per variant), with
the integer arguments Triton specialised to the constant 1 turned back into
runtime int32 values, so the generic variant for arbitrary strides is the one
checked (a column-major input runs it). In that IR a finding is an
``arith.muli`` computed in i32 whose value flows into the offset of a
``tt.addptr`` (directly, through casts, broadcasts, sums, loop-carried values
or loop bounds), where

- both factors are runtime values (``offs_m * stride_xm``, ``n * K``,
  ``pid_b * stride_b``): the product of two extents is not bounded by either, or
- one factor is derived from a ``stride_*`` argument (``BLOCK_K * stride_xk``,
  the usual pointer increment): a stride can be any int32.

Products computed in i64 are not reported, nor a runtime value times a
compile-time constant that is not a stride (``pid * BLOCK_M``, the start of a
tile, bounded by the extent it tiles). Widening after the product
(``(a * b).to(tl.int64)``) is still reported: the wrap has already happened.
A value proven to fit may be narrowed back explicitly
(``tl.minimum(pid.to(tl.int64) * step, M).to(tl.int32)``).

Not covered: a constexpr used as a row length (``rows * BLOCK_D``; fastpeft
kernels take row lengths and strides as runtime arguments), sums of two
in-range int32 terms, and block pointers (``tl.make_block_ptr``, not used).

Each finding names the kernel variant, the source line (and the kernel line
an inlined helper was called from) and the two factors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import linecache
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .aot_spec import uninterpreted_environment


@dataclass(frozen=True)
class NarrowProduct:
    """One i32 product that reaches an address."""

    function: str  # the @triton.jit function
    kernel: str  # the spec name of the first variant that has it
    location: str  # "path:line" of the multiplication, " <- path:line" for each call site it was inlined at
    source: str  # the source line of the multiplication
    factors: tuple[str, str]  # each factor's origin: an argument, program_id, arange or the variable it was

    def __str__(self) -> str:
        return f"{self.location}: i32 {self.factors[0]} * {self.factors[1]} [{self.kernel}]  |  {self.source}"


# --------------------------------------------------------------------------- specs and TTIR

def unspecialised(spec):
    """``spec`` with the integer arguments Triton specialised to 1 passed as runtime i32 values."""
    from .aot_spec import KernelSpec

    signature, constexprs = dict(spec.signature), dict(spec.constexprs)
    for param in spec.fn.params:
        value = constexprs.get(param.name)
        if (not param.is_constexpr and signature.get(param.name) == "constexpr" and isinstance(value, int)
                and not isinstance(value, bool)):
            signature[param.name] = "i32"
            del constexprs[param.name]
    return KernelSpec(spec.name, spec.fn, signature, constexprs, spec.num_warps, spec.num_stages, spec.is_gemm,
                      spec.attrs)


def ttir(spec, arch: int = 90) -> str:
    """The Triton IR of ``spec`` after Triton's TTIR passes (inlining, canonicalisation), with locations."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    source = ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    stages = {}
    backend.add_stages(stages, options, source.language)
    return str(stages["ttir"](module, {}))


# --------------------------------------------------------------------------- the IR analysis

_VALUE = re.compile(r"%[\w$.-]+")
_RESULTS = re.compile(r"^\s*(%[\w$.-]+)(?::\d+)?\s*=\s*(.*)$")
_OPNAME = re.compile(r'^"?([a-z_]+\.[\w.]+)"?')
_LOC_REF = re.compile(r"\s*loc\((#loc\d*)\)\s*$")
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_FILE_LOC = re.compile(r'^"([^"]+)":(\d+):\d+')
_ARG = re.compile(r"(%[\w$.-]+): ([^,)]+?)(?: \{[^}]*\})? loc\(")
_SHAPE_OR_CAST = {"tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "arith.extsi", "arith.extui",
                  "arith.trunci", "arith.index_cast"}


@dataclass
class _Op:
    name: str
    results: list[str]  # value ids (see _Function)
    operands: list[str]
    type: str  # the text after the last " : " (the result type for arith ops)
    loc: str
    carried: list[str] = dataclasses.field(default_factory=list)  # a loop's induction variable and iter_args


def _strip(value: str) -> str:
    return value.split("#", 1)[0]


class _Function:
    """The data flow of one ``tt.func``: which values each value is computed from.

    MLIR reuses SSA names in sibling regions (the two branches of an ``scf.if``),
    so each definition gets a unique id ``<name>@<n>`` and a name is resolved
    in the innermost region that defines it.
    """

    def __init__(self, text: str):
        self.deps: dict[str, set[str]] = {}
        self.defining: dict[str, _Op] = {}
        self.args: set[str] = set()
        self.ops: list[_Op] = []
        self.locs: dict[str, str] = {}
        self.offsets: set[str] = set()
        self._count = 0
        self._scopes: list[dict[str, str]] = [{}]
        regions: list[_Op] = []
        for line in text.splitlines():
            stripped = line.strip()
            loc_def = _LOC_DEF.match(stripped)
            if loc_def:
                self.locs[loc_def.group(1)] = loc_def.group(2)
            elif stripped.startswith("tt.func"):
                self.args = {self._define(name, None) for name, _ in _ARG.findall(stripped)}
            elif stripped.startswith("}"):
                if regions:
                    self._scopes.pop()
                    if stripped.endswith("{"):  # } else {
                        self._scopes.append({})
                    else:
                        regions.pop()
            elif stripped.startswith("^bb"):  # block arguments of a reduce/scan region: opaque values
                for name in _VALUE.findall(stripped):
                    self._define(name, None)
            else:
                self._operation(line, regions)

    def _define(self, name: str, op: _Op | None) -> str:
        self._count += 1
        uid = f"{name}@{self._count}"
        self._scopes[-1][name] = uid
        if op is not None:
            self.defining[uid] = op
        return uid

    def _use(self, name: str) -> str:
        name = _strip(name)
        for scope in reversed(self._scopes):
            if name in scope:
                return scope[name]
        return name

    def _operation(self, line: str, regions: list) -> None:
        loc = _LOC_REF.search(line)
        body = line[:loc.start()] if loc else line
        match = _RESULTS.match(body)
        result_name, rest = (match.group(1), match.group(2)) if match else (None, body.strip())
        opname = _OPNAME.match(rest)
        if not opname:
            return
        op = _Op(opname.group(1), [], [], rest.rsplit(" : ", 1)[1].strip() if " : " in rest else "",
                 loc.group(1) if loc else "")
        carried = []
        if op.name == "scf.for":
            # %r = scf.for %iv = %lb to %ub step %st iter_args(%a = %init, ...) -> (...) : i32 {
            pairs = re.findall(r"(%[\w$.-]+) = (%[\w$.#-]+)", rest)
            bounds = [pairs[0][1]] + re.findall(r"(?:to|step) (%[\w$.#-]+)", rest)
            op.operands = [self._use(v) for v in bounds]
            carried = [(pairs[0][0], list(op.operands))] + [(a, [self._use(init)]) for a, init in pairs[1:]]
            op.operands += [self._use(init) for _, init in pairs[1:]]
        else:
            op.operands = [self._use(v) for v in _VALUE.findall(rest)]
        if result_name:
            op.results = [self._define(result_name, op)]
        self.ops.append(op)
        for result in op.results:
            # A load's value carries no address arithmetic; everything else is computed from its operands.
            self.deps[result] = set() if op.name == "tt.load" else set(op.operands)
        if op.name in ("scf.yield", "tt.reduce.return", "tt.scan.return") and regions:
            for value in regions[-1].results + regions[-1].carried:  # a region's values come from what it yields
                self.deps.setdefault(value, set()).update(op.operands)
        if op.name == "tt.addptr":
            self.offsets.add(op.operands[1])
        if line.rstrip().endswith("{"):
            regions.append(op)
            self._scopes.append({})
            for name, sources in carried:
                uid = self._define(name, op)
                op.carried.append(uid)
                self.deps[uid] = set(sources)

    def _through_shapes(self, value: str, leaf) -> bool:
        seen = set()
        while value not in seen:
            seen.add(value)
            if leaf(value):
                return True
            op = self.defining.get(value)
            if op is None or op.name not in _SHAPE_OR_CAST or not op.operands:
                return False
            value = op.operands[0]
        return False

    def constant(self, value: str) -> bool:
        return self._through_shapes(value, lambda v: getattr(self.defining.get(v), "name", "") == "arith.constant")

    def from_stride(self, value: str) -> bool:
        return self._through_shapes(value, lambda v: v in self.args and v[1:].startswith("stride_"))

    def describe(self, value: str) -> str:
        """A factor by where it comes from: the argument, ``program_id``, ``arange`` or its variable."""
        seen = set()
        while value not in seen:
            seen.add(value)
            op = self.defining.get(value)
            if value in self.args or op is None or op.name not in _SHAPE_OR_CAST | {"tt.get_program_id",
                                                                                  "tt.make_range"}:
                return re.sub(r"(_\d+)?@\d+$", "", value[1:])
            if op.name == "tt.get_program_id":
                return "program_id"
            if op.name == "tt.make_range":
                return "arange"
            value = op.operands[0]
        return value[1:]

    def address_inputs(self) -> set[str]:
        """Every value some ``tt.addptr`` offset is computed from."""
        seen, todo = set(), list(self.offsets)
        while todo:
            value = todo.pop()
            if value in seen:
                continue
            seen.add(value)
            todo.extend(self.deps.get(value, ()))
        return seen

    def narrow_products(self) -> list[_Op]:
        reaches = self.address_inputs()
        found = []
        for op in self.ops:
            if op.name != "arith.muli" or not re.search(r"(^|x)i32>?$", op.type) or op.results[0] not in reaches:
                continue
            a, b = op.operands[:2]
            runtime = not self.constant(a) and not self.constant(b)
            if runtime or self.from_stride(a) or self.from_stride(b):
                found.append(op)
        return found

    def location(self, loc: str) -> list[tuple[str, int]]:
        """``[(path, line), ...]``: the multiplication first, then the call sites it was inlined at."""
        text = self.locs.get(loc, loc)
        for _ in range(64):
            file_loc = _FILE_LOC.match(text)
            if file_loc:
                return [(file_loc.group(1), int(file_loc.group(2)))]
            callsite = re.match(r"^callsite\((#loc\d*) at (#loc\d*)\)$", text)
            if callsite:
                return self.location(callsite.group(1)) + self.location(callsite.group(2))
            named = re.match(r'^"[^"]*"\((#loc\d*)\)$', text)
            if named:
                text = self.locs.get(named.group(1), "")
                continue
            if text.startswith("#loc"):
                text = self.locs.get(text, "")
                continue
            return []
        return []


def narrow_address_products(ttir_text: str, function: str = "", kernel: str = "") -> list[NarrowProduct]:
    """The findings in one TTIR module (see the module docstring)."""
    ir = _Function(ttir_text)
    if not ir.offsets:  # every kernel addresses memory: nothing parsed means the IR text changed form
        raise RuntimeError(f"offset check: no tt.addptr parsed in the TTIR of {kernel or function}")
    found = []
    for op in ir.narrow_products():
        frames = ir.location(op.loc)
        where = " <- ".join(f"{_short(path)}:{line}" for path, line in frames) or "?"
        source = linecache.getline(frames[0][0], frames[0][1]).strip() if frames else ""
        factors = tuple(ir.describe(v) for v in op.operands[:2])
        found.append(NarrowProduct(function, kernel, where, source, factors))
    return found


def _short(path: str) -> str:
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    return path[len(root):] if path.startswith(root) else path


# --------------------------------------------------------------------------- modules

def module_variants(module: str) -> list:
    """Every variant ``module.aot_launches()`` launches, unspecialised (see ``unspecialised``), one per variant."""
    from .aot_spec import aot_module, record_specs

    variants, keys = [], set()
    for spec in record_specs(aot_module(module).aot_launches):
        spec = unspecialised(spec)
        key = spec.key()[:-2]  # warps and stages do not change the TTIR
        if key not in keys:
            keys.add(key)
            variants.append(spec)
    return variants


_SPECS: list = []  # what forked workers of check_specs read


def _findings_of(index: int) -> list[NarrowProduct]:
    spec = _SPECS[index]
    return narrow_address_products(ttir(spec), spec.fn.__name__, spec.name)


def check_specs(specs, workers: int | None = None) -> list[NarrowProduct]:
    """Findings of every spec, one per (kernel, source location, factors); ``workers`` forked processes."""
    global _SPECS
    _SPECS = list(specs)
    workers = min(workers or os.cpu_count() or 1, len(_SPECS))
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            per_spec = list(pool.map(_findings_of, range(len(_SPECS)), chunksize=4))
    else:
        per_spec = [_findings_of(i) for i in range(len(_SPECS))]
    found, seen = [], set()
    for findings in per_spec:
        for finding in findings:
            key = (finding.function, finding.location, finding.factors)
            if key not in seen:
                seen.add(key)
                found.append(finding)
    return found


def check_modules(modules=None) -> list[NarrowProduct]:
    """Findings of every variant of ``modules`` (default: every kernel module); modules may be any importable
    module with an ``aot_launches()``. Runs in a child Python when this one has ``TRITON_INTERPRET=1``."""
    from .aot_spec import kernel_modules

    modules = tuple(modules) if modules else kernel_modules()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return _check_in_child(modules)
    variants, keys = [], set()
    for module in modules:
        for spec in module_variants(module):  # a variant launched by two modules is checked once
            if spec.key()[:-2] not in keys:
                keys.add(spec.key()[:-2])
                variants.append(spec)
    return check_specs(variants)


def _check_in_child(modules) -> list[NarrowProduct]:
    env = uninterpreted_environment()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "findings.json"
        cmd = [sys.executable, "-m", "gates.offset_check", "--quiet", "--json", str(out),
               "--modules", *modules]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode not in (0, 1) or not out.exists():
            raise RuntimeError(f"offset check subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return [NarrowProduct(**{**row, "factors": tuple(row["factors"])}) for row in json.loads(out.read_text())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gates.offset_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--modules", nargs="+", help="modules with aot_launches() (default: every kernel module)")
    parser.add_argument("--json", type=Path, help="also write the findings to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    found = check_modules(args.modules)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(f) for f in found], indent=1))
    if not args.quiet:
        for finding in found:
            print(finding)
        print(f"{len(found)} int32 products reach an address")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
