"""The side environment the AdapterHub parity tests drive: a venv with ``adapters==1.3.0`` and ``transformers==4.57.6``.

``adapters`` 1.3 pins transformers 4.57, which cannot share the test
environment (transformers 5), so the tests build a venv that sees the system
site-packages (torch, safetensors, numpy come from there) and installs the two
pinned packages into it (its transformers shadows the system one). It is
cached in ``~/.cache/fastpeft/adapterhub-venv`` (``FASTPEFT_ADAPTERHUB_VENV``
moves it), built once under a lock file (parallel test runs wait for one
build), and marked ready only after an import check, so a half-built venv is
rebuilt. Only PyPI is needed. When it cannot be built, ``side_python`` raises
with pip's output: the parity tests fail, they do not skip.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = ("adapters==1.3.0", "transformers==4.57.6")
ADAPTERS_VERSION, TRANSFORMERS_VERSION = "1.3.0", "4.57.6"
MARKER = "fastpeft-ready.json"
INSTALL_TIMEOUT_S = 900

_CHECK = (
    "import json, torch, transformers, adapters; "
    "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
    "'adapters': adapters.__version__, 'transformers_file': transformers.__file__}))"
)


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "fastpeft" / "adapterhub-venv"
    return Path(os.environ.get("FASTPEFT_ADAPTERHUB_VENV", default))


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def side_env() -> dict:
    """Environment variables for processes in the side env: offline hub, no user site, no stray PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list, what: str, timeout: float) -> str:
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=side_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"AdapterHub side env: {what} did not finish in {timeout:.0f} s: {' '.join(map(str, cmd))}")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"AdapterHub side env: {what} failed (exit {proc.returncode}): "
                           f"{' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


def _check(venv: Path) -> dict:
    out = _run([_python(venv), "-c", _CHECK], "import check", 300)
    versions = json.loads(out.strip().splitlines()[-1])
    problems = []
    if versions["adapters"] != ADAPTERS_VERSION:
        problems.append(f"adapters {versions['adapters']} (want {ADAPTERS_VERSION})")
    if versions["transformers"] != TRANSFORMERS_VERSION:
        problems.append(f"transformers {versions['transformers']} (want {TRANSFORMERS_VERSION})")
    if not versions["transformers_file"].startswith(str(venv)):
        problems.append(f"transformers imported from {versions['transformers_file']}, not from the venv")
    if versions["torch"] != torch.__version__:
        problems.append(f"torch {versions['torch']} (the test env has {torch.__version__})")
    if problems:
        raise RuntimeError(f"AdapterHub side env at {venv} is wrong: {'; '.join(problems)}")
    return versions


def _build(venv: Path) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], "venv creation", 300)
    _run([_python(venv), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *PACKAGES],
         f"pip install {' '.join(PACKAGES)}", INSTALL_TIMEOUT_S)
    _see_test_env_packages(venv)


def _see_test_env_packages(venv: Path) -> None:
    """Put the test env's site-packages after the venv's own (a ``.pth`` file), written after pip ran.

    ``--system-site-packages`` exposes the base interpreter's packages only;
    when the tests run from a venv (CI), torch lives in that venv, so its
    site-packages must be added too. Entries of a ``.pth`` file come after the
    venv's own site-packages, so the pinned transformers still shadows.
    """
    own = subprocess.run([str(_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env=side_env()).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(own, "fastpeft-test-env.pth").write_text("".join(p + "\n" for p in parents))


def side_python() -> Path:
    """The side env's python, built first if needed (idempotent; one builder at a time, under a lock file)."""
    venv = venv_dir()
    marker = venv / MARKER
    if marker.is_file() and _python(venv).is_file():
        return _python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / (venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (marker.is_file() and _python(venv).is_file()):
                _build(venv)
                versions = _check(venv)
                marker.write_text(json.dumps(versions))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _python(venv)


def run_in_side_env(script: Path, *args, timeout: float = 600) -> str:
    """Run ``script`` with the side env's python; RuntimeError with its output when it fails."""
    return _run([side_python(), script, *args], f"{script.name}", timeout)
