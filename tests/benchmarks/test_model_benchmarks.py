"""The two stand-alone measuring scripts run end to end at tiny sizes (their figures are not checked here).

- ``python -m benchmarks.standalone.prefix_tuning_step``: a prefix-tuning training step, fastpeft vs PEFT; the
  variants compute the same first loss (the script's own consistency column), PEFT with gradient
  checkpointing is reported as the error PEFT raises;
- ``python -m benchmarks.standalone.overhead``: the fixed per-call cost of the LoRA/QLoRA layers vs PEFT.
"""
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.standalone import overhead, prefix_tuning_step  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def test_prefix_tuning_step_runs_and_variants_agree(tmp_path, capsys):
    out = tmp_path / "step.json"
    code = prefix_tuning_step.main(["--device", "cpu", "--dtypes", "float32", "--batch", "1", "--seq", "16",
                                    "--prefix", "4", "--reps", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert {"fastpeft", "peft", "fastpeft+ckpt", "peft+ckpt"} <= set(rows)
    losses = [rows[v]["first_loss"] for v in ("fastpeft", "peft", "fastpeft+ckpt")]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
    assert rows["peft+ckpt"].get("error")
    assert "fastpeft" in capsys.readouterr().out


def test_overhead_script_runs(capsys):
    code = overhead.main(["--op", "lora", "--dtype", "float32", "--tokens", "1", "--k", "32", "--n", "32",
                          "--rounds", "2", "--threads", "1"])
    assert code == 0
    assert "peft" in capsys.readouterr().out.lower()
