"""The GPU machine's compiler beside ours: a cached venv with ``triton==3.6.0`` for the kernel report.

The GPU machine we may be lent runs triton 3.6; we develop with 3.8. The two
compile the same kernel differently (registers, spills, wgmma pipelining), so
the static gate also runs under 3.6 (``tests/gates/test_triton36_report.py``).
The venv sees the test environment's packages (torch, numpy: a
``--system-site-packages`` venv, plus a ``.pth`` naming the test environment's
site-packages when that is itself a venv, placed after the venv's own so its
triton shadows ours) and installs only triton. It is cached in
``~/.cache/fastpeft/triton-<version>-venv`` (``FASTPEFT_TRITON_SIDE_VENV``
moves it), built once under a lock file and marked ready only after an import
check. ``compile_rows`` compiles chosen report variants there
(``python -m gates.triton_side_env``, reading and writing JSON).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

VERSION = "3.6.0"
MARKER = "fastpeft-ready.json"
REPO = Path(__file__).resolve().parents[1]


def venv_dir(version: str = VERSION) -> Path:
    default = Path.home() / ".cache" / "fastpeft" / f"triton-{version}-venv"
    return Path(os.environ.get("FASTPEFT_TRITON_SIDE_VENV", default))


def side_env() -> dict:
    """A child's environment: this checkout (and nothing else) on PYTHONPATH, no interpreter, no user site."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(REPO), PYTHONNOUSERSITE="1")
    return env


def _run(cmd: list, what: str, timeout: float) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=side_env())
    if proc.returncode != 0:
        raise RuntimeError(f"triton {VERSION} side env: {what} failed (exit {proc.returncode}): "
                           f"{' '.join(map(str, cmd))}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def _build(venv: Path, version: str) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], "venv creation", 300)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-deps",
          f"triton=={version}"], f"pip install triton=={version}", 900)
    own = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "site query", 60).strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(own, "fastpeft-test-env.pth").write_text("".join(p + "\n" for p in parents))
    out = _run([python, "-c", "import json, triton, torch; print(json.dumps({'triton': triton.__version__, "
                "'file': triton.__file__}))"], "import check", 300)
    found = json.loads(out.strip().splitlines()[-1])
    if found["triton"] != version or not found["file"].startswith(str(venv)):
        raise RuntimeError(f"triton side env at {venv} imports triton {found['triton']} from {found['file']}")
    (venv / MARKER).write_text(json.dumps(found))


def side_python(version: str = VERSION) -> Path:
    """The side venv's python, built first if needed (one builder at a time, under a lock file)."""
    venv = venv_dir(version)
    python = venv / "bin" / "python"
    if (venv / MARKER).is_file() and python.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not ((venv / MARKER).is_file() and python.is_file()):
                _build(venv, version)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return python


def compile_rows(jobs: list, version: str = VERSION, workers: int = 0, timeout: float = 3000) -> list:
    """``KernelReportRow``s of ``jobs`` (``(module, spec name, arch)``) compiled with triton ``version``."""
    from .kernel_report import row_from_json

    request = json.dumps({"jobs": [list(j) for j in jobs], "workers": workers})
    proc = subprocess.run([str(side_python(version)), "-m", "gates.triton_side_env"], input=request,
                          capture_output=True, text=True, timeout=timeout, env=side_env())
    if proc.returncode != 0:
        raise RuntimeError(f"kernel report under triton {version} failed:\n{proc.stderr[-4000:]}")
    return [row_from_json(row) for row in json.loads(proc.stdout.strip().splitlines()[-1])]


def _compile_job(job) -> dict:
    from .aot_spec import module_specs
    from .kernel_report import compile_spec

    module, name, arch = job
    spec = next(s for s in module_specs(module) if s.name == name)
    return dataclasses.asdict(compile_spec(spec, int(arch), module))


def main() -> int:
    """Reads ``{"jobs": [[module, name, arch], ...], "workers": n}`` on stdin, prints the rows as one JSON line."""
    from concurrent.futures import ProcessPoolExecutor

    request = json.loads(sys.stdin.read())
    jobs, workers = request["jobs"], request.get("workers") or min(len(request["jobs"]), os.cpu_count() or 1)
    if workers <= 1:
        rows = [_compile_job(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_compile_job, jobs))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
