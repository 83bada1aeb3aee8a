"""What the ahead-of-time kernel report compiles: the launches the launchers really make.

See ``docs/architecture.md`` ("The static GPU gate"). The Triton JIT compiles
one variant per set of constexprs *and* per specialisation of the other
arguments: an integer equal to 1 becomes a constant, pointers and integers
divisible by 16 carry a divisibility hint (which decides vector widths and
pipelining). A hand-written spec easily differs from what runs, so no spec is
written by hand:

- every public module ``fastpeft.kernels.<op>`` has its AOT module
  ``gates.aot.<op>`` (``aot_module``), whose ``aot_launches()`` calls the
  kernel module's launchers on realistic CPU tensors (contiguous, the
  benchmark shapes, every rank class and every feature flag), labelling each
  group of calls with ``launch_label`` at its own call sites: the launchers
  carry no report code;
- ``record_specs(aot_launches)`` runs it with Triton's launch replaced by a
  recorder and turns each launch into a ``KernelSpec`` through Triton's own
  binder (the code ``JITFunction.run`` uses), so the report compiles exactly
  the variant a GPU would;
- ``kernel_modules()`` finds the kernel modules, so a new kernel module is in
  the report without being listed anywhere, and one without its AOT module
  fails (``tests/test_registries.py``).

Each spec also carries the launch grid (``grid``: the first launch's) and the
grid sizes of every launch marked ``launch_label(..., headline=True)``: a
benchmark headline shape, where the report's grid gate asks the launch to put
at least one CTA on every SM (``KernelSpec.headline_grids``).

Recording runs no kernel: it needs neither a GPU nor the interpreter, but it
must run in a process without ``TRITON_INTERPRET=1`` (``@triton.jit`` then
makes the ``JITFunction`` objects the recorder needs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Optional

from .tf32 import tf32_specs

_ARCH_FOR_BINDING = 90  # specialisation does not depend on the arch; any CUDA target binds


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant as ``triton.compile`` needs it, plus how the report judges it.

    ``signature`` maps every argument name to its Triton type ("*fp16", "i32",
    "constexpr", ...); ``constexprs`` the constant values by argument name;
    ``attrs`` the ``ASTSource`` attributes by argument path (divisibility
    hints). ``is_gemm`` marks kernels whose inner loop is a ``tl.dot`` on
    tensor-core precisions: those must contain tensor-core instructions.
    ``grid`` is the grid of the first launch of this variant; ``headline_grids``
    holds ``(label, CTAs)`` of each launch of it at a benchmark headline shape
    (``launch_label(..., headline=True)``), in launch order.
    """

    name: str
    fn: Any
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    is_gemm: bool = True
    attrs: dict = field(default_factory=dict)
    grid: tuple = ()
    headline_grids: tuple = ()

    @property
    def grid_ctas(self) -> int:
        """CTAs of the first launch (0 when it was not recorded)."""
        return grid_size(self.grid) if self.grid else 0

    def key(self) -> tuple:
        """What makes two specs the same compiled variant."""
        return (self.fn.__name__, tuple(sorted(self.signature.items())),
                tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())), self.num_warps, self.num_stages)


def grid_size(grid: tuple) -> int:
    """Number of programs (CTAs) of a launch grid ``(x[, y[, z]])``."""
    size = 1
    for extent in grid:
        size *= int(extent)
    return size


@dataclass(frozen=True)
class RecordedLaunch:
    fn: Any
    args: tuple
    kwargs: dict
    label: str
    is_gemm: bool
    grid: tuple = ()
    headline: bool = False


_LABEL: list[tuple[str, bool, bool]] = [("", True, False)]


@contextlib.contextmanager
def launch_label(label: str, is_gemm: bool, headline: bool = False):
    """Names the launches made inside the block (``<kernel>[<label>]``) and says whether they are GEMMs.

    ``headline=True`` marks them as launches at a benchmark headline shape: the
    kernel report then requires their grid to fill the GPU (one CTA per SM).
    """
    _LABEL.append((label, bool(is_gemm), bool(headline)))
    try:
        yield
    finally:
        _LABEL.pop()


def epilogue_kernels() -> frozenset:
    """The kernels every AOT module declares as epilogues (``EPILOGUE_KERNELS``).

    An epilogue's work scales with a small output (the sum of a split
    reduction's partials of ``[M, r]``), not with the layer: its launches keep
    the label they are made under but are neither GEMMs nor headline launches,
    so the grid gate does not ask them to fill the GPU. Declared by kernel, so
    the launcher that makes them needs no report code.
    """
    return frozenset(fn for module in kernel_modules() for fn in getattr(aot_module(module), "EPILOGUE_KERNELS", ()))


@contextlib.contextmanager
def recording(epilogues: Optional[frozenset] = None):
    """Inside the block, ``kernel[grid](...)`` records a ``RecordedLaunch`` instead of running.

    Launches of a kernel in ``epilogues`` (default: ``epilogue_kernels()``) are recorded as epilogues.
    """
    from triton.runtime.jit import JITFunction

    from fastpeft._backend import triton_interpreter_enabled

    if triton_interpreter_enabled():
        raise RuntimeError("AOT specs are recorded from JIT launches: run this in a process without "
                           "TRITON_INTERPRET=1 (gates.kernel_report does so by itself)")
    epilogues = epilogue_kernels() if epilogues is None else epilogues

    launches: list[RecordedLaunch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        label, is_gemm, headline = _LABEL[-1]
        if self in epilogues:
            is_gemm = headline = False
        if callable(grid):
            raise TypeError(f"{self.__name__}: the recorder needs a tuple grid, not a function of the meta-parameters")
        launches.append(RecordedLaunch(self, args, kwargs, label, is_gemm, tuple(int(g) for g in grid), headline))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def uninterpreted_environment() -> dict:
    """This process's environment for a child Python that records and compiles: no ``TRITON_INTERPRET``, and
    ``PYTHONPATH`` set to this ``sys.path`` so the child imports the same ``gates`` and ``fastpeft``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


@functools.lru_cache(maxsize=None)
def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", _ARCH_FOR_BINDING, 32))


def spec_of_launch(launch: RecordedLaunch) -> KernelSpec:
    """The variant Triton's JIT would compile for this launch (its binder and argument packing)."""
    from triton.runtime.jit import create_function_from_signature

    fn, backend = launch.fn, _backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs), bound_args,
                                                          specialization, options)
    by_name = {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    name = f"{fn.__name__.lstrip('_').removesuffix('_kernel')}[{launch.label}]"
    headline = ((launch.label, grid_size(launch.grid)),) if launch.headline else ()
    return KernelSpec(name, fn, dict(signature), by_name, options.num_warps, options.num_stages,
                      launch.is_gemm, dict(attrs), launch.grid, headline)


def record_specs(aot_launches: Callable[[], None]) -> list[KernelSpec]:
    """The distinct variants ``aot_launches()`` launches, in first-launch order.

    Two launches of one variant give one spec (the first label and grid win;
    the headline grids of all its launches are collected); a label reused by
    different variants gets ``#2``, ``#3`` ... appended.
    """
    with recording() as launches:
        aot_launches()
    specs, index, names = [], {}, {}
    for launch in launches:
        spec = spec_of_launch(launch)
        if spec.key() in index:
            i = index[spec.key()]
            if spec.headline_grids:
                specs[i] = dataclasses.replace(specs[i], headline_grids=specs[i].headline_grids + spec.headline_grids)
            continue
        index[spec.key()] = len(specs)
        count = names[spec.name] = names.get(spec.name, 0) + 1
        if count > 1:
            spec = dataclasses.replace(spec, name=f"{spec.name}#{count}")
        specs.append(spec)
    return specs


def kernel_modules() -> tuple[str, ...]:
    """Every public module of ``fastpeft.kernels`` (each has its AOT module, ``aot_module``)."""
    from fastpeft import kernels

    return tuple(f"{kernels.__name__}.{info.name}" for info in pkgutil.iter_modules(kernels.__path__)
                 if not info.name.startswith("_"))


KERNEL_PACKAGE = "fastpeft.kernels."


def aot_module(module: str) -> ModuleType:
    """The module whose ``aot_launches()`` covers ``module``.

    ``gates.aot.<op>`` for the kernel module ``fastpeft.kernels.<op>``; any
    other module (a test's fixture kernels) defines ``aot_launches`` itself.
    """
    if module.startswith(KERNEL_PACKAGE):
        return importlib.import_module(f"{__package__}.aot.{module[len(KERNEL_PACKAGE):]}")
    return importlib.import_module(module)


@functools.lru_cache(maxsize=None)
def module_specs(module: str) -> tuple[KernelSpec, ...]:
    """``record_specs`` of ``module``'s ``aot_launches``, less the variants of modules before it.

    Modules reuse each other's launchers (QLoRA runs LoRA's shrink kernel): a
    variant is reported once, by the first module in ``kernel_modules()``
    order that launches it. Cached per process.
    """
    earlier = set()
    for other in kernel_modules():
        if other == module:
            break
        earlier.update(spec.key() for spec in module_specs(other))
    launches = aot_module(module).aot_launches
    specs = record_specs(launches)
    specs += tf32_specs(launches, {spec.key() for spec in specs})  # gates/tf32.py
    return tuple(spec for spec in specs if spec.key() not in earlier)


def all_spec_keys() -> set:
    """The keys of every variant of every kernel module."""
    return {spec.key() for module in kernel_modules() for spec in module_specs(module)}
