"""The machine a run is on: device choice, default dtype, result folder names, and metadata for results.json."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def choose_device(requested: Optional[str]) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or the GPU when there is one, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_tag(device: torch.device) -> str:
    """Folder name for this machine's results, e.g. ``cpu-amd-epyc-2t`` or ``cuda-nvidia-h100``."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    if device.type == "cpu":
        return f"cpu-{slug}-{torch.get_num_threads()}t"
    return f"cuda-{slug}"


def run_folder_name(device: torch.device, when: Optional[datetime.datetime] = None) -> str:
    """A new run's folder: the device tag and the UTC time, e.g. ``cpu-amd-epyc-2t-20261127T130501Z``.

    ``benchmarks/.gitignore`` ignores such names under benchmarks/results, so a
    run leaves ``git status`` clean; a committed set has a plain tag.
    """
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return f"{device_tag(device)}-{when.strftime('%Y%m%dT%H%M%SZ')}"


def load_average() -> Optional[list]:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken optional install must not stop the metadata
        return f"not available ({type(exc).__name__})"


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def fastpeft_backend(device: torch.device) -> str:
    try:
        from fastpeft._backend import select_backend

        return select_backend(device).value
    except Exception as exc:
        return f"unknown ({exc})"


def metadata(device: torch.device, dtypes: list, command: str) -> dict:
    """Machine, versions, commit, the run's input dtypes (names) and the load average now (``load_avg_before``)."""
    meta = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": git_commit(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": device_name(device),
        "dtypes": list(dtypes),
        "load_avg_before": load_average(),
        "fastpeft_backend": fastpeft_backend(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "versions": {m: _version(m) for m in ("torch", "triton", "peft", "bitsandbytes", "transformers", "fastpeft")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return meta
