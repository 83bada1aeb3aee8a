"""The ahead-of-time kernel report (registers, spills, shared memory, tensor cores) as plain rows.

Wraps ``gates.kernel_report.compile_report``; it compiles every Triton
kernel config for sm_80 and sm_90 without a GPU. When it cannot be imported or
fails, the suite says so in its output instead of leaving the report out
silently.

Compiling every config takes minutes on a small CPU, so a report is reused
from an earlier results.json (any result folder under benchmarks/results) when
its fingerprint (triton version, arches, and the bytes of every kernel source
and of the gates: report tool and AOT launches) is unchanged; the output says when it was reused. The
suite runs it by default on a GPU machine only (``--kernel-report`` asks for it
anywhere) and prints it as one line; the rows go to kernel_report.csv.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

ARCHES = (80, 90)


def fingerprint() -> str:
    """Hash of what the report depends on: triton's version, the arches, the kernel and tool sources."""
    import triton

    import fastpeft.kernels
    import gates

    digest = hashlib.sha256(f"{triton.__version__} {ARCHES}".encode())
    gates_dir = Path(gates.__file__).parent
    for path in (sorted(Path(fastpeft.kernels.__file__).parent.glob("*.py")) + sorted(gates_dir.glob("*.py"))
                 + sorted(gates_dir.glob("aot/*.py"))):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _cached(previous_json: Path, key: str):
    try:
        report = json.loads(previous_json.read_text())["kernel_report"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if isinstance(report, dict) and report.get("fingerprint") == key and "rows" in report else None


def previous_results(*folders: Path) -> list:
    """results.json files in ``folders`` and in their subfolders, newest first."""
    found = []
    for folder in folders:
        folder = Path(folder)
        found += [folder / "results.json"] + sorted(folder.glob("*/results.json"))
    found = [p for p in dict.fromkeys(found) if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def kernel_report(previous=None) -> dict:
    """``{"rows": [...], "seconds": s, "fingerprint": f, "reused_from": path-or-None}`` or ``{"unavailable": reason}``.

    ``previous``: a results.json, or a list of them, whose report is reused when
    its fingerprint matches.
    """
    try:
        from gates.kernel_report import compile_report

        key = fingerprint()
    except Exception as exc:
        return {"unavailable": f"import gates.kernel_report failed: {type(exc).__name__}: {exc}"}
    candidates = [] if previous is None else [previous] if isinstance(previous, (str, Path)) else list(previous)
    for previous_json in candidates:
        cached = _cached(Path(previous_json), key)
        if cached is not None:
            return {**cached, "reused_from": f"{previous_json} ({cached.get('timestamp_utc', 'earlier run')})"}
    started = time.perf_counter()
    try:
        report = compile_report(arches=ARCHES)
    except Exception as exc:
        return {"unavailable": f"compile_report failed: {type(exc).__name__}: {exc}"}
    rows = []
    for r in report:
        row = dataclasses.asdict(r)
        row.update(spills=r.spills, tensor_core=r.tensor_core, problems=list(r.problems()))
        rows.append(row)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"rows": rows, "seconds": time.perf_counter() - started, "fingerprint": key, "reused_from": None,
            "timestamp_utc": stamp}
