"""The x86-64 instruction-set level of every CPU-specific path, and how to force one.

fastpeft's native CPU extension is compiled with ``-march=native``, and torch's
own CPU libraries pick their kernels by the machine too (ATen's vectorised
reductions, oneDNN's and MKL's GEMMs: AVX2, AVX-512, AVX512-BF16, AMX). Two
x86-64 machines therefore run different code and round differently. So that
each path can be tested on whichever machine a test runs on, one setting forces
a level for all of them at once:

``FASTPEFT_CPU_ISA`` = ``native`` (default: what the machine has) |
``avx512`` | ``avx2`` | ``baseline`` (SSE2, the scalar codecs).

A forced level compiles the extension with that level's ``-march`` (in its own
build folder) and, through :func:`forced_environment`, tells a new process's
torch libraries to stay at or below it (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``). Those three are read when torch loads,
so a level is forced for a whole process (tests start one per level). A level
the CPU cannot run raises a ``RuntimeError`` naming the missing features
instead of dying on an illegal instruction.

``FASTPEFT_NF4_AMX=0`` keeps the fused AMX kernels off on a CPU that has them
(every forced level below ``native`` implies it); ``1`` or unset uses them
where the CPU, OS and build allow.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

ENV_ISA = "FASTPEFT_CPU_ISA"
ENV_AMX = "FASTPEFT_NF4_AMX"


@dataclass(frozen=True)
class IsaLevel:
    """One forceable level: the compiler's ``-march``, the CPU flags it needs, torch's matching settings."""

    name: str
    march: str
    needs: tuple[str, ...]
    torch_env: dict


LEVELS = {
    level.name: level
    for level in (
        IsaLevel("native", "native", (), {}),
        IsaLevel("avx512", "x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"),
                 dict(ATEN_CPU_CAPABILITY="avx512", ONEDNN_MAX_CPU_ISA="AVX512_CORE", MKL_CBWR="AVX512",
                      FASTPEFT_NF4_AMX="0")),
        IsaLevel("avx2", "x86-64-v3", ("avx2", "fma", "bmi2", "f16c"),
                 dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2", FASTPEFT_NF4_AMX="0")),
        IsaLevel("baseline", "x86-64", (),
                 dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_CBWR="COMPATIBLE",
                      FASTPEFT_NF4_AMX="0")),
    )
}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def selected_level() -> IsaLevel:
    """The level ``FASTPEFT_CPU_ISA`` names (``native`` when unset); raises where this CPU cannot run it."""
    name = os.environ.get(ENV_ISA, "native").strip().lower() or "native"
    level = LEVELS.get(name)
    if level is None:
        raise ValueError(f"{ENV_ISA}={name!r}: expected one of {sorted(LEVELS)}")
    return check_runnable(level)


def check_runnable(level: IsaLevel) -> IsaLevel:
    """``level`` itself, or a RuntimeError naming what this machine lacks to run it."""
    if level.name == "native":
        return level
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"{ENV_ISA}={level.name!r} is an x86-64 level; this machine is {platform.machine()}")
    missing = [flag for flag in level.needs if flag not in cpu_flags()]
    if missing:
        raise RuntimeError(f"{ENV_ISA}={level.name!r}: this CPU lacks {', '.join(missing)}")
    return level


def runnable_levels() -> list[str]:
    """The forced levels this machine can run (besides ``native``), most capable first."""
    runnable = []
    for name in ("avx512", "avx2", "baseline"):
        try:
            check_runnable(LEVELS[name])
        except RuntimeError:
            continue
        runnable.append(name)
    return runnable


def forced_environment(name: str) -> dict:
    """Environment variables that run a new Python process at level ``name``: fastpeft's and torch's."""
    level = check_runnable(LEVELS[name])
    return {ENV_ISA: level.name, **level.torch_env}


def amx_allowed() -> bool:
    """False when ``FASTPEFT_NF4_AMX=0`` keeps the fused AMX kernels off (they still need CPU and OS support)."""
    return os.environ.get(ENV_AMX, "1").strip() != "0"
