"""Lazy builder and loader of fastpeft's native extension (csrc/).

Two extensions, both registering torch custom ops in the ``fastpeft_native``
namespace (``torch.ops.fastpeft_native.<op>``):

- ``cpu``: the C++ NF4 kernels (OpenMP; AVX2 / AVX-512 / AMX when the build machine has them:
  ``FASTPEFT_CPU_ISA`` forces a lower level, see ``cpu_isa``)
  and every op schema. Built on first use of an op.
- ``cuda``: CUDA kernels for the same schemas (NF4 dequantize, M=1 decode
  GEMV). Built only when CUDA is available or when asked for explicitly
  (``load_cuda(force=True)``, used by the compile-and-link test on machines
  without a GPU). Needs the ``cpu`` extension loaded first (it owns the schemas).

A build prints one line to stderr when it starts (the first use of an NF4
op compiles for a while). Builds use ``torch.utils.cpp_extension.load`` (ninja) with ``-O3
-march=native -fopenmp`` (or a forced level's ``-march``) and are cached in ``$FASTPEFT_BUILD_DIR`` (default
``~/.cache/fastpeft/native``), one folder per extension, torch version,
machine, CPU feature set and forced level; torch rebuilds when a source changes. The sources are found next to
the package (``<repo>/csrc``), so the native extension needs a source checkout
installed in editable mode (``pip install -e .``).

``FASTPEFT_NATIVE_PREBUILT=<folder>`` loads ``libfastpeft_native_cpu.so`` (and
``libfastpeft_native_cuda.so``) built by the top-level CMakeLists.txt from that
folder instead of compiling.

Without a compiler the package still imports: ``available()`` is False and
``op(name)`` raises a ``RuntimeError`` naming the op and the build error.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

from . import cpu_isa

ENV_BUILD_DIR = "FASTPEFT_BUILD_DIR"
ENV_PREBUILT = "FASTPEFT_NATIVE_PREBUILT"
NAMESPACE = "fastpeft_native"
CSRC = Path(__file__).resolve().parents[2] / "csrc"
# SASS for A100 and H100, plus compute_90 PTX that the driver JIT-compiles on newer GPUs.
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                   "-gencode=arch=compute_90,code=compute_90"]

_lock = threading.Lock()
_loaded: dict[str, bool] = {}
_errors: dict[str, BaseException] = {}
_ops: dict[str, object] = {}


def build_root() -> Path:
    root = os.environ.get(ENV_BUILD_DIR)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fastpeft" / "native"


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: a -march=native build is only reused on a matching CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def build_dir(kind: str) -> Path:
    level = cpu_isa.selected_level().name
    tag = f"{kind}-torch{torch.__version__.replace('+', '_')}-{platform.machine()}-{_cpu_tag()}"
    if level != "native":
        tag += f"-{level}"
    path = build_root() / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_sources() -> list[str]:
    return sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp")) + [str(CSRC / "bindings" / "cpu_ops.cpp")]


def cuda_sources() -> list[str]:
    return sorted(str(p) for p in (CSRC / "cuda").glob("*.cu")) + [str(CSRC / "bindings" / "cuda_ops.cpp")]


def _check_sources() -> None:
    if not (CSRC / "include" / "fastpeft" / "nf4_codec.h").is_file():
        raise RuntimeError(
            f"fastpeft's C++ sources are not at {CSRC}; the native extension is built from a source "
            "checkout installed with `pip install -e .`"
        )


def _load_prebuilt(kind: str, folder: str) -> None:
    lib = Path(folder).expanduser() / f"libfastpeft_native_{kind}.so"
    if not lib.is_file():
        raise RuntimeError(f"{ENV_PREBUILT}={folder!r} has no {lib.name} (build it with the top-level CMakeLists.txt)")
    torch.ops.load_library(str(lib))


def _import_cpp_extension():
    """``torch.utils.cpp_extension``, imported without its CUDA_HOME guess warning on machines without CUDA
    (logged at import time; it concerns CUDA builds only, which ``_point_torch_at_cuda`` settles)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _needs_build(kind: str, sources: list[str]) -> bool:
    """True when no built library is cached for ``kind`` or a source is newer than it (a compile will run)."""
    library = build_dir(kind) / f"fastpeft_native_{kind}.so"
    if not library.is_file():
        return True
    built = library.stat().st_mtime
    headers = [str(p) for p in CSRC.rglob("*.h")]
    return any(os.path.getmtime(src) > built for src in [*sources, *headers])


def _announce_build(kind: str) -> None:
    print(f"fastpeft: compiling the native {kind} extension (first use; about 15-60 s, cached in "
          f"{build_dir(kind)})", file=sys.stderr, flush=True)


def _load(kind: str, verbose: bool) -> None:
    prebuilt = os.environ.get(ENV_PREBUILT)
    if prebuilt:
        _load_prebuilt(kind, prebuilt)
        return
    cpp_extension = _import_cpp_extension()

    _check_sources()
    if _needs_build(kind, cpu_sources() if kind == "cpu" else cuda_sources()):
        _announce_build(kind)
    include = [str(CSRC / "include"), str(CSRC)]
    common = dict(
        build_directory=str(build_dir(kind)),
        extra_include_paths=include,
        is_python_module=False,
        verbose=verbose,
    )
    if kind == "cpu":
        cpp_extension.load(
            name="fastpeft_native_cpu",
            sources=cpu_sources(),
            extra_cflags=["-O3", f"-march={cpu_isa.selected_level().march}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            **common,
        )
    else:
        _point_torch_at_cuda(cpp_extension)
        cpp_extension.load(
            name="fastpeft_native_cuda",
            sources=cuda_sources(),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", *CUDA_ARCH_FLAGS],
            with_cuda=True,
            **common,
        )


def _point_torch_at_cuda(cpp_extension) -> None:
    """torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script outside the toolkit
    (seen: /usr/local/bin/nvcc -> CUDA_HOME=/usr/local). Prefer $CUDA_HOME, then /usr/local/cuda."""
    def has_toolkit(path) -> bool:
        return path is not None and (Path(path) / "include" / "cuda_runtime.h").is_file()

    if has_toolkit(cpp_extension.CUDA_HOME):
        return
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if has_toolkit(candidate):
            cpp_extension.CUDA_HOME = str(candidate)
            return
    raise RuntimeError(f"no CUDA toolkit found (torch's CUDA_HOME={cpp_extension.CUDA_HOME!r}); set CUDA_HOME")


def _ensure(kind: str, verbose: bool = False) -> None:
    with _lock:
        if _loaded.get(kind):
            return
        if kind in _errors:
            raise RuntimeError(f"fastpeft's native {kind} extension failed to build: {_errors[kind]}") from _errors[kind]
        try:
            _load(kind, verbose)
        except Exception as exc:  # compiler missing, build error, ...
            _errors[kind] = exc
            raise RuntimeError(f"fastpeft's native {kind} extension failed to build: {exc}") from exc
        _loaded[kind] = True


def load_cpu(verbose: bool = False) -> None:
    """Build (first time) and load the CPU extension; raises RuntimeError on failure."""
    _ensure("cpu", verbose)


def load_cuda(force: bool = False, verbose: bool = False) -> None:
    """Build and load the CUDA extension; without ``force`` only when CUDA is available."""
    if not force and not torch.cuda.is_available():
        raise RuntimeError("the CUDA extension is only built when CUDA is available (or with force=True)")
    load_cpu(verbose)
    _ensure("cuda", verbose)


def available() -> bool:
    """True when the CPU extension is (or can be) built and loaded."""
    try:
        load_cpu()
    except RuntimeError:
        return False
    return True


def op(name: str, cuda: bool = False):
    """``torch.ops.fastpeft_native.<name>``, building the extension(s) on first use.

    With ``cuda=True`` the CUDA extension is loaded too (its kernels serve CUDA tensors).
    """
    if name in _ops and (not cuda or _loaded.get("cuda")):
        return _ops[name]
    try:
        load_cpu()
        if cuda:
            load_cuda()
    except RuntimeError as exc:
        raise RuntimeError(f"native op fastpeft_native::{name} is unavailable: {exc}") from exc
    cached = _ops.get(name)
    if cached is not None:
        return cached
    try:
        found = getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        raise RuntimeError(f"native op fastpeft_native::{name} does not exist in the built extension") from None
    _ops[name] = found
    return found
