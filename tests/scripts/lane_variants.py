"""pytest plugin: counts the Triton variants a test run would JIT-compile on a GPU.

``python -m pytest -p lane_variants --lane-variants OUT.json <tests>`` (CPU lane,
under the interpreter, from tests/scripts on ``sys.path``): every interpreted
launch is also bound by Triton's own JIT binder (``gates/aot_spec.py``'s
``spec_of_launch``, what a GPU's ``JITFunction.run`` would compile), and the
distinct variant keys are written to OUT.json with the launches per kernel.
``scripts/gpu_lane.sh --dry-run`` prints the count and the compile time it
predicts at 16 workers. Slow (it runs the tests): the measurement is committed
(``tests/scripts/lane_variants.json``) with the source hash it was measured at.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def source_hash(paths) -> str:
    """sha256 over the kernel and test sources a measurement depends on (sorted paths, their bytes)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def measured_sources(selection) -> list:
    """The kernel modules and the lane's test files."""
    files = list((ROOT / "fastpeft" / "kernels").glob("*.py"))
    for item in selection:
        p = ROOT / item
        files += list(p.rglob("test_*.py")) if p.is_dir() else [p]
    return files


def pytest_addoption(parser):
    parser.addoption("--lane-variants", default=None, help="write the distinct JIT variants to this JSON file")


def pytest_configure(config):
    out = config.getoption("--lane-variants")
    if not out:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from gates.aot_spec import RecordedLaunch, spec_of_launch

    keys, per_kernel, twins = set(), {}, {}
    interpreted_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        twin = twins.get(id(self))
        if twin is None:
            twin = twins[id(self)] = JITFunction(self.fn, **self.kwargs)
        key = spec_of_launch(RecordedLaunch(twin, args, kwargs, "", False)).key()
        if key not in keys:
            keys.add(key)
            per_kernel[twin.__name__] = per_kernel.get(twin.__name__, 0) + 1
        return interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    config._lane_variants = (Path(out), keys, per_kernel)


def pytest_sessionfinish(session):
    state = getattr(session.config, "_lane_variants", None)
    if state is None:
        return
    out, keys, per_kernel = state
    selection = [str(Path(a).resolve().relative_to(ROOT)) for a in session.config.args]
    out.write_text(json.dumps({"variants": len(keys), "per_kernel": dict(sorted(per_kernel.items())),
                               "selection": selection,
                               "source_hash": source_hash(measured_sources(selection))}, indent=1) + "\n")
