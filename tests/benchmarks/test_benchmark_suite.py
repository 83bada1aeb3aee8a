"""The benchmark suite (``python -m benchmarks``) in its smallest mode: files written and well-formed.

Runs in-process on CPU with the CPU path forced (the test session turns the
Triton interpreter on, which the suite must not time) and without the
``torch.compile`` provider (its compile alone takes longer than the rest).
"""
import csv
import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import cli  # noqa: E402
from benchmarks.harness import summarize  # noqa: E402
from benchmarks.ops import OP_MODULES, load_ops  # noqa: E402
from benchmarks.runner import ERROR, NOT_AVAILABLE, OK, shapes_for  # noqa: E402
from benchmarks.spec import Provider  # noqa: E402

FAST = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--no-kernel-report"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _read_csv(path: Path) -> list:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_suite_writes_csv_json_summary_and_plots(tmp_path):
    providers = ["base", "fastpeft", "peft", "torch", "dense", "bitsandbytes", "peft+bnb"]
    code = cli.main(FAST + ["--out", str(tmp_path), "--providers", *providers])
    assert code == 0

    rows = _read_csv(tmp_path / "results.csv")
    expected = 0
    for op in load_ops():
        chosen = [p for p in op.providers if p.name in providers]
        expected += len(shapes_for(op, "cpu", "quick")) * len(op.modes) * len(chosen)
    assert len(rows) == expected
    assert {r["op"] for r in rows} == set(OP_MODULES)
    for r in rows:
        assert r["status"] in (OK, NOT_AVAILABLE), r
        if r["status"] == OK:
            assert float(r["median_ms"]) > 0
            assert float(r["q25_ms"]) <= float(r["median_ms"]) <= float(r["q75_ms"])
            assert float(r["gflops"]) > 0 and float(r["gbps"]) > 0
            if r["role"] == "baseline":
                assert float(r["overhead"]) == 1.0
    lora_fastpeft = [r for r in rows if r["op"] == "lora" and r["provider"] == "fastpeft"]
    assert lora_fastpeft and all(r["status"] == OK for r in lora_fastpeft)
    assert all(float(r["fastpeft_speedup"]) == 1.0 for r in lora_fastpeft)
    forward_peers = [r for r in rows if r["op"] == "lora" and r["mode"] == "forward" and r["role"] == "peer"]
    assert all(float(r["rel_err"]) < 1e-4 for r in forward_peers)
    assert all(r["saved_mb"] != "" for r in rows if r["mode"] == "forward+backward" and r["status"] == OK)

    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["metadata"]
    for key in ("timestamp_utc", "command", "git_commit", "cpu_model", "cpu_count", "torch_threads", "versions"):
        assert meta[key] not in (None, ""), key
    assert meta["command"].startswith("python -m benchmarks --quick")
    assert set(meta["versions"]) >= {"torch", "triton", "peft", "bitsandbytes"}
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_gflops"] > 0
    assert len(data["results"]) == expected
    assert "unavailable" in data["kernel_report"]

    summary = (tmp_path / "summary.md").read_text()
    assert meta["command"] in summary and "## LoRA linear: forward+backward" in summary
    assert "Not included: skipped" in summary

    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs][:1] == ["speedup_lora.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_fastpeft_exception_is_an_error_row_and_fails_the_command(tmp_path, monkeypatch):
    op = load_ops(["lora"])[0]

    def broken(case):
        raise RuntimeError("kernel exploded")

    providers = [Provider("fastpeft", broken, ours=True) if p.name == "fastpeft" else p for p in op.providers]
    providers.append(Provider("missing", broken, unavailable=lambda: "import nothing failed"))
    monkeypatch.setattr(op, "providers", providers)
    code = cli.main(FAST + ["--out", str(tmp_path), "--op", "lora", "--modes", "forward", "--tokens", "4",
                            "--providers", "fastpeft", "missing"])
    assert code == 1
    rows = {r["provider"]: r for r in _read_csv(tmp_path / "results.csv")}
    assert rows["fastpeft"]["status"] == ERROR and "kernel exploded" in rows["fastpeft"]["note"]
    assert rows["missing"]["status"] == NOT_AVAILABLE and rows["missing"]["note"] == "import nothing failed"
    assert rows["base"]["status"] == OK and rows["base"]["fastpeft_speedup"] == ""


def test_shape_overrides():
    op = load_ops(["lora"])[0]
    shapes = shapes_for(op, "cpu", "quick", tokens=[3, 5], dims=[cli._dims("K=N=64,r=4")])
    assert shapes == [dict(tokens=3, K=64, N=64, r=4), dict(tokens=5, K=64, N=64, r=4)]
    nf4 = load_ops(["nf4"])[0]
    assert shapes_for(nf4, "cpu", "quick", dims=[dict(K=512, N=128, r=4)])[0] == dict(tokens=1, K=512, N=128)


def test_summarize_median_and_quartiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_s, t.q25_s, t.q75_s, t.reps) == (3.0, 2.0, 4.0, 5)
    assert t.iqr_fraction == pytest.approx(2.0 / 3.0)


def test_kernel_report_is_reused_while_kernel_sources_are_unchanged(tmp_path):
    from benchmarks import kernel_report as kr

    key = kr.fingerprint()
    row = dict(module="fastpeft.kernels.lora", name="k", arch=90, problems=[])
    previous = tmp_path / "results.json"
    previous.write_text(json.dumps({"kernel_report": {"rows": [row], "fingerprint": key, "seconds": 1.0}}))
    report = kr.kernel_report(previous)
    assert report["rows"] == [row] and str(previous) in report["reused_from"]
    previous.write_text(json.dumps({"kernel_report": {"rows": [row], "fingerprint": "stale", "seconds": 1.0}}))
    assert kr._cached(previous, key) is None
