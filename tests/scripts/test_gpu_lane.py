"""The GPU lane's dry run (``bash scripts/gpu_lane.sh --dry-run``) holds on this machine.

It takes the lane's exact path with the network cut and bitsandbytes blocked,
collects the GPU selection without one CUDA call and writes the results folder
the lane would bring back. This test fails if fewer than 1,000 tests are
selected, if collection has an error, if the folder would not come back
(more than 8 files, or a file below its top level), or if the script's exit
status is not 0.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_selects_the_gpu_tests_and_writes_at_most_8_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTPEFT_", "TRITON_"))}
    env["PYTHON"] = sys.executable
    results = tmp_path / "results"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_lane.sh"), "--dry-run", str(results)], env=env,
                         capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    selected = re.search(r"^selected (\d+) tests, 0 collection errors$", out, re.M)
    assert selected and int(selected.group(1)) >= 1000, out[-4000:]
    assert re.search(r"^variants: \d+ distinct Triton variants", out, re.M), out[-4000:]
    assert "verdict: PASS" in out
    entries = list(results.rglob("*"))
    assert len(entries) <= 8 and all(p.is_file() and p.parent == results for p in entries), entries
    assert {"verdict.txt", "lane.log", "tests.xml", "extras.tar.gz"} <= {p.name for p in entries}
    assert re.search(r"^network: ", out, re.M)
