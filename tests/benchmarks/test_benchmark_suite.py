"""The benchmark suite (``python -m benchmarks``) in its smallest mode: files written and well-formed,
the repository left alone, errors against float64 and equal-precision ratios, flags, README update, plots.

Runs in-process on CPU with the CPU path forced (the test session turns the
Triton interpreter on, which the suite must not time) and without the
``torch.compile`` provider (its compile alone takes longer than the rest).
"""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.suite import cli  # noqa: E402
from benchmarks.suite.harness import summarize  # noqa: E402
from benchmarks.ops import OP_MODULES, load_ops  # noqa: E402
from benchmarks.suite.runner import (ERROR, NOT_AVAILABLE, OK, dtypes_for, selected_providers,  # noqa: E402
                                     shapes_for)
from benchmarks.suite.spec import Provider  # noqa: E402

FAST = ["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--no-kernel-report"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def _read_csv(path: Path) -> list:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _git_status(*paths) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout


def test_quick_suite_writes_a_new_run_folder_and_leaves_the_repository_alone(tmp_path, monkeypatch, capsys):
    providers = ["base", "fastpeft", "peft", "torch", "dense", "bitsandbytes", "peft+bnb"]
    monkeypatch.setenv(cli.RESULTS_ENV, str(tmp_path))
    watched = ("benchmarks/results", "README.md")
    before = _git_status(*watched)
    code = cli.main(["--quick", "--device", "cpu", "--threads", "1", "--no-progress", "--providers", *providers])
    assert code == 0
    assert _git_status(*watched) == before
    (out,) = tmp_path.iterdir()
    assert re.fullmatch(r"cpu-.+-1t-\d{8}T\d{6}Z", out.name)
    assert subprocess.run(["git", "check-ignore", "-q", f"benchmarks/results/{out.name}/results.json"],
                          cwd=REPO_ROOT).returncode == 0, "run folders must be ignored by git"

    rows = _read_csv(out / "results.csv")
    train_rows = [r for r in rows if r["op"] == "train_step"]  # the default run's training-step level
    assert train_rows and {r["status"] for r in train_rows} == {OK}, [r["note"] for r in train_rows if r["note"]]
    rows = [r for r in rows if r["op"] != "train_step"]
    expected = 0
    for op in load_ops():
        chosen = selected_providers(op, providers)  # the baseline and reference always run
        n_dtypes = len(dtypes_for(op, "cpu", "quick", torch.float32))
        expected += n_dtypes * len(shapes_for(op, "cpu", "quick")) * len(op.modes) * len(chosen)
    assert len(rows) == expected
    assert {r["op"] for r in rows} == set(OP_MODULES)
    assert {r["dtype"] for r in rows if r["op"] in ("lora", "nf4", "qlora")} == {"float32", "bfloat16"}
    for r in rows:
        assert r["status"] in (OK, NOT_AVAILABLE), r
        if r["status"] == OK:
            assert float(r["median_ms"]) > 0
            assert float(r["q25_ms"]) <= float(r["median_ms"]) <= float(r["q75_ms"])
            assert float(r["gflops"]) > 0 and float(r["gbps"]) > 0
            assert r["rel_err"] != "" and r["compute_dtype"] != "", r
            assert ("noisy" in r["flags"]) == (float(r["iqr_pct"]) > 10), r
            if r["role"] == "baseline":
                assert float(r["overhead"]) == 1.0
    lora_fastpeft = [r for r in rows if r["op"] == "lora" and r["provider"] == "fastpeft"]
    assert lora_fastpeft and all(r["status"] == OK for r in lora_fastpeft)
    assert all(float(r["fastpeft_speedup"]) == 1.0 for r in lora_fastpeft)
    lora_peers = [r for r in rows if r["op"] == "lora" and r["role"] == "peer"]
    for r in lora_peers:  # unfused torch and PEFT compute in their input dtype: equal precision, same inputs
        assert r["compute_dtype"] == r["dtype"] and r["speedup_vs"] == r["dtype"], r
        assert float(r["rel_err"]) < (1e-5 if r["dtype"] == "float32" else 2e-2), r
    assert all(r["saved_mb"] != "" for r in rows if r["mode"] == "forward+backward" and r["status"] == OK)

    data = json.loads((out / "results.json").read_text())
    meta = data["metadata"]
    for key in ("timestamp_utc", "command", "git_commit", "cpu_model", "cpu_count", "torch_threads", "versions",
                "load_avg_before", "load_avg_after", "dtypes"):
        assert meta[key] not in (None, ""), key
    assert len(meta["load_avg_before"]) == 3 and len(meta["load_avg_after"]) == 3
    assert meta["command"].startswith("python -m benchmarks --quick")
    assert set(meta["versions"]) >= {"torch", "triton", "peft", "bitsandbytes"}
    assert data["ceilings"]["copy_gbps"] > 0
    assert set(data["ceilings"]["matmul_gflops"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in data["ceilings"]["matmul_gflops"].values())
    assert len(data["results"]) == expected + len(train_rows)
    assert "without a GPU" in data["kernel_report"]["unavailable"]  # skipped by default on a CPU machine

    summary = (out / "summary.md").read_text()
    assert meta["command"] in summary and "load average" in summary
    for title in ("## Headline: LoRA linear, float32", "## Headline: QLoRA linear (NF4 base + LoRA), bfloat16",
                  "## LoRA linear: forward+backward, bfloat16", "## NF4 linear (QLoRA base layer): forward, float32",
                  "## Headline: Training step (forward, backward, AdamW) of a whole model, bfloat16 autocast"):
        assert title in summary
    assert "kernel report not included: skipped on a machine without a GPU" in summary

    terminal = capsys.readouterr().out
    last_headline = terminal.rindex("Headline: ")
    assert terminal.rindex(" - forward") < last_headline, "headline tables print after the per-op tables"
    assert terminal.index("kernel report not included") < terminal.index("Headline: ")

    pngs = sorted(out.glob("*.png"))
    # the adapter's plot has its AdapterHub line even when no other peer of it ran
    assert {"speedup_lora.png", "speedup_adapter.png"} <= {p.name for p in pngs}
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
                            "--dtype", "float32", "--providers", "fastpeft", "missing"])
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
    from benchmarks.suite import kernel_report as kr

    key = kr.fingerprint()
    row = dict(module="fastpeft.kernels.lora", name="k", arch=90, problems=[])
    previous = tmp_path / "results.json"
    previous.write_text(json.dumps({"kernel_report": {"rows": [row], "fingerprint": key, "seconds": 1.0}}))
    report = kr.kernel_report(previous)
    assert report["rows"] == [row] and str(previous) in report["reused_from"]
    previous.write_text(json.dumps({"kernel_report": {"rows": [row], "fingerprint": "stale", "seconds": 1.0}}))
    assert kr._cached(previous, key) is None


def test_compute_dtype_is_read_off_the_error_against_float64():
    from benchmarks.suite.precision import compute_dtype

    assert compute_dtype(2.8e-7, "float32") == "float32"
    assert compute_dtype(1.4e-3, "float32") == "bfloat16"  # bitsandbytes' CPU forward on AVX512-BF16
    assert compute_dtype(2e-4, "float32") == "tf32/float16"
    assert compute_dtype(0.0, "float32") == "float32"  # an exact float32 output is still float32
    assert compute_dtype(1e-7, "bfloat16") == "bfloat16"  # never more precise than the output dtype
    assert compute_dtype(0.2, "float32") == "lower"
    assert compute_dtype(None, "float32") == "" and compute_dtype(float("nan"), "float32") == ""


def _row(provider, role, dtype, compute, ms, mode="forward", shape="tokens=1", iqr=1.0, pct=50.0):
    return dict(op="qlora", mode=mode, shape=shape, group="", tokens=1, provider=provider, role=role, dtype=dtype,
                compute_dtype=compute, status=OK, median_ms=ms, q25_ms=ms * 0.99, q75_ms=ms * 1.01, iqr_pct=iqr,
                pct_peak_flops=pct, pct_peak_bw=pct / 2)


def test_peers_are_compared_with_fastpeft_at_the_precision_they_compute_in():
    from benchmarks.suite.runner import add_speedups

    op = load_ops(["qlora"])[0]
    rows = [_row("fastpeft", "fastpeft", "float32", "float32", 10.0),
            _row("fastpeft", "fastpeft", "bfloat16", "bfloat16", 4.0),
            _row("peft+bnb", "peer", "float32", "bfloat16", 2.0),  # fp32 inputs, computes in bf16
            _row("torch", "peer", "float32", "float32", 20.0),
            _row("peft+bnb", "peer", "bfloat16", "bfloat16", 8.0),
            _row("peft+bnb", "peer", "float32", "bfloat16", 3.0, mode="backward")]  # no fastpeft row there
    add_speedups(op, rows)
    assert [r.get("fastpeft_speedup") for r in rows] == [1.0, 1.0, 0.5, 2.0, 2.0, None]
    assert [r.get("speedup_vs") for r in rows[:5]] == ["float32", "bfloat16", "bfloat16", "float32", "bfloat16"]
    assert rows[5]["speedup_vs"] == "no fastpeft row at bfloat16"
    assert rows[2]["speedup_same_inputs"] == 0.2 and "speedup_same_inputs" not in rows[5]

    from benchmarks.report.tables import _speedup_cell, _time_cell

    assert _time_cell(rows[2]) == "2.00 ±1% [bf16]" and _speedup_cell(rows[2]) == "0.50x [vs bf16]"
    assert _speedup_cell(rows[3]) == "2.00x" and _speedup_cell(rows[5]) == "n/a [bf16]"


def test_noisy_rows_and_rows_above_a_ceiling_are_flagged_and_reported():
    from benchmarks.report.outputs import flag_lines
    from benchmarks.suite.runner import add_flags, flagged, headline_rows
    from benchmarks.report.tables import _time_cell

    op = load_ops(["qlora"])[0]
    rows = [_row("fastpeft", "fastpeft", "float32", "float32", 10.0, iqr=25.0),
            _row("peft+bnb", "peer", "float32", "bfloat16", 2.0, pct=140.0),
            _row("torch", "peer", "float32", "float32", 20.0, iqr=30.0)]  # not a headline provider
    add_flags(rows)
    assert [r["flags"] for r in rows] == ["noisy", "above ceiling", "noisy"]
    assert _time_cell(rows[0]) == "10.0 ±25%~" and _time_cell(rows[1]) == "2.00 ±1%^ [bf16]"
    lines = flag_lines(flagged(headline_rows([op], rows)))
    assert lines[0].startswith("WARNING: 2 headline row(s) flagged") and len(lines) == 3
    assert "noisy (IQR ±25%)" in lines[1] and "140% of the float32 matmul ceiling" in lines[2]
    assert flag_lines(flagged(headline_rows([op], rows[2:]))) == []


def test_a_row_that_fits_in_the_last_level_cache_is_held_to_the_cache_read_ceiling():
    from benchmarks.suite.ceilings import Ceilings
    from benchmarks.report.outputs import ceilings_line

    ceilings = Ceilings(copy_gbps=20.0, read_gbps=24.0, matmul_gflops={"float32": 190.0}, copy_bytes=2**28,
                        matmul_size=2048, cache_read_gbps=90.0, cache_bytes=300 * 2**20)
    assert ceilings.bandwidth_for(64 * 2**20) == 90.0  # a 4096² fp32 weight stays in a 300 MiB L3
    assert ceilings.bandwidth_for(200 * 2**20) == 24.0  # more than half the cache: DRAM
    no_cache = Ceilings(copy_gbps=20.0, read_gbps=24.0, matmul_gflops={"float32": 190.0}, copy_bytes=2**28,
                        matmul_size=2048)
    assert no_cache.bandwidth_for(1024) == 24.0  # a GPU (L2 flushed between repetitions)
    line = ceilings_line(ceilings.as_dict())
    assert "300 MiB last-level cache 90.0 GB/s" in line and "best of 1024³ and 2048³" in line
    assert "cache" not in ceilings_line(no_cache.as_dict())


def test_last_level_cache_size_is_read_from_sysfs(tmp_path, monkeypatch):
    from benchmarks.suite import ceilings

    for index, size in enumerate(("48K", "2048K", "300M")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    real_path = ceilings.Path
    monkeypatch.setattr(ceilings, "Path", lambda p: real_path(tmp_path) if "cache" in str(p) else real_path(p))
    assert ceilings.last_level_cache_bytes() == 300 * 2**20


def test_update_readme_rewrites_only_the_marked_block_from_a_committed_set(tmp_path, monkeypatch):
    from benchmarks.report import readme

    results = tmp_path / "benchmarks" / "results"
    text = "intro\n<!-- benchmark-results:cpu:start -->\nold\n<!-- benchmark-results:cpu:end -->\noutro\n"
    (tmp_path / "README.md").write_text(text)
    monkeypatch.setattr(readme, "README", tmp_path / "README.md")
    monkeypatch.setattr(readme, "RESULTS_ROOT", results)
    with pytest.raises(SystemExit, match="committed result set"):
        readme.check_target(tmp_path / "elsewhere", "cpu")
    with pytest.raises(SystemExit, match="no block"):
        readme.check_target(results / "cpu-test", "cuda")
    with pytest.raises(SystemExit, match="ignored by git"):
        readme.check_target(REPO_ROOT / "benchmarks/results/cpu-x-20261127T130501Z", "cpu",
                            results_root=REPO_ROOT / "benchmarks/results")

    (results / "cpu-test").mkdir(parents=True)
    for stale in ("kernel_report.csv", "speedup_nf4.png"):  # outputs of the set being replaced
        (results / "cpu-test" / stale).write_text("old")
    code = cli.main(FAST + ["--out", str(results / "cpu-test"), "--update-readme", "--op", "lora", "--modes",
                            "forward", "--tokens", "4", "--dims", "K=N=64,r=4", "--providers", "fastpeft"])
    assert code == 0
    assert sorted(p.name for p in (results / "cpu-test").iterdir()) == [
        "results.csv", "results.json", "speedup_lora.png", "summary.md"]
    new = (tmp_path / "README.md").read_text()
    assert new.startswith("intro\n<!-- benchmark-results:cpu:start -->\n") and new.endswith(
        "<!-- benchmark-results:cpu:end -->\noutro\n") and "\nold\n" not in new
    assert "Committed CPU result set (`benchmarks/results/cpu-test/`)" in new
    summary = (results / "cpu-test" / "summary.md").read_text()
    tables = re.findall(r"^## Headline: (.+)\n\n((?:\|.*\n)+)", summary, flags=re.M)
    assert [t for t, _ in tables] == ["LoRA linear, float32", "LoRA linear, bfloat16"]
    for title, table in tables:
        assert f"### Headline: {title}\n\n{table}" in new
    command = re.search(r"^Command: `python -m benchmarks[^`]*`", summary, flags=re.M).group(0)
    assert command in new


def test_speedup_plot_has_log_ratio_axes_error_bars_and_a_panel_per_mode_and_precision(tmp_path):
    from benchmarks.report.plots import plot_op, speedup_series

    rows = [_row("fastpeft", "fastpeft", "float32", "float32", 10.0),
            _row("torch", "peer", "float32", "float32", 20.0),
            _row("fastpeft", "fastpeft", "bfloat16", "bfloat16", 4.0),
            _row("peft+bnb", "peer", "float32", "bfloat16", 2.0)]
    from benchmarks.suite.runner import add_speedups

    add_speedups(load_ops(["qlora"])[0], rows)
    series = speedup_series(rows, "qlora", "forward")
    assert set(series) == {"float32", "bfloat16"}
    (tokens, ratio, low, high), = series["float32"][("torch", "")]
    assert ratio == 2.0 and low == pytest.approx(20 * 0.99 / (10 * 1.01)) and high == pytest.approx(20 * 1.01 / 9.9)
    assert list(series["bfloat16"]) == [("peft+bnb, fp32 inputs", "")]
    path = tmp_path / "p.png"
    assert plot_op(rows, "qlora", "QLoRA", ["forward", "backward"], path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_ratio_axis_labels_several_ticks_on_a_narrow_range_and_decades_on_a_wide_one():
    import matplotlib.pyplot as plt

    from benchmarks.report.plots import _ratio_ticks

    fig, ax = plt.subplots()
    ax.set_yscale("log")
    _ratio_ticks(ax, [0.93, 1.12])
    narrow = list(ax.get_yticks())
    assert 1.0 in narrow and len(narrow) >= 3 and min(narrow) >= 0.93 / 1.1 and max(narrow) <= 1.12 * 1.1
    _ratio_ticks(ax, [1.5, 180.0])
    wide = list(ax.get_yticks())
    assert 1.0 in wide and 100.0 in wide and 3 <= len(wide) <= 8
    plt.close(fig)


def test_an_op_with_many_shape_groups_gets_a_panel_per_group(tmp_path):
    from benchmarks.report.plots import MAX_GROUPS_PER_PANEL, _panels

    groups = [f"P={p}" for p in range(MAX_GROUPS_PER_PANEL + 1)]
    by_mode = {"forward": {"float32": {("torch", g): [(1, 1.0, 1.0, 1.0)] for g in groups}}}
    assert _panels(by_mode, ["forward"]) == [("float32", g) for g in groups]
    few = {"forward": {"float32": {("torch", g): [(1, 1.0, 1.0, 1.0)] for g in groups[:2]}}}
    assert _panels(few, ["forward"]) == [("float32", None)]


def test_an_op_whose_baseline_is_a_peer_gets_its_speedup():
    from benchmarks.suite.runner import add_speedups

    op = load_ops(["adapter"])[0]
    assert op.baseline_is_peer and op.baseline == "adapterhub"
    rows = [dict(_row("fastpeft", "fastpeft", "float32", "float32", 5.0), op="adapter"),
            dict(_row("adapterhub", "baseline", "float32", "float32", 10.0), op="adapter")]
    add_speedups(op, rows)
    assert rows[1]["fastpeft_speedup"] == 2.0


def test_a_reference_that_cannot_run_in_float64_leaves_the_error_out_and_says_why(monkeypatch):
    import dataclasses

    from benchmarks.suite.ceilings import measure_ceilings
    from benchmarks.suite.harness import POLICIES
    from benchmarks.suite.runner import Task, run_task

    op = load_ops(["lora"])[0]
    torch_ref = op.provider("torch")

    def no_float64(case):
        if case.dtype == torch.float64:
            raise TypeError("float64 is not supported")
        return torch_ref.build(case)

    providers = [dataclasses.replace(p, build=no_float64) if p.name == "torch" else p for p in op.providers]
    monkeypatch.setattr(op, "providers", providers)
    device, policy = torch.device("cpu"), POLICIES[("cpu", "quick")]
    ceilings = measure_ceilings(device, [torch.float32], "quick", policy)
    task = Task(op, dict(tokens=3, K=32, N=16, r=4), "forward", torch.float32)
    rows = {r["provider"]: r for r in run_task(task, [op.provider("base"), op.provider("fastpeft")], device,
                                               policy, ceilings)}
    assert rows["base"]["compute_dtype"] == "float32"  # the baseline is compared with its own float64 run
    assert "rel_err" not in rows["fastpeft"] and rows["fastpeft"]["status"] == OK
    assert "no float64 torch run, so no error: TypeError: float64 is not supported" in rows["fastpeft"]["note"]


def test_kernel_report_is_one_line_and_skipped_by_default_without_a_gpu(tmp_path):
    from benchmarks.report.tables import kernel_report_line

    assert "without a GPU" in cli._kernel_report(None, torch.device("cpu"), tmp_path)["unavailable"]
    assert "--no-kernel-report" in cli._kernel_report(False, torch.device("cuda"), tmp_path)["unavailable"]
    rows = [dict(module="fastpeft.kernels.lora", name="fwd", arch=a, problems=p)
            for a, p in ((80, []), (90, ["12 B spilled"]))]
    line = kernel_report_line({"rows": rows, "seconds": 3.0}, tmp_path / "kernel_report.csv")
    assert "\n" not in line
    assert line.startswith("kernel report: 2 configs of 1 kernels for sm_80, sm_90 (compiled in 3 s): "
                           "1 with problems (lora.fwd)") and line.endswith("kernel_report.csv")


def test_cuda_timing_uses_the_measured_device_and_its_stream(monkeypatch):
    """With ``--device cuda:1`` the events go on cuda:1's stream inside a cuda:1 device context (mocked CUDA)."""
    from benchmarks.suite import harness

    entered, recorded = [], []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(stream)

        def elapsed_time(self, other):
            return 1.0

    class FakeDeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(harness, "L2Flusher", lambda device: (lambda: None))
    device = torch.device("cuda:1")
    timing = harness.measure(lambda i: None, lambda i: None, device, harness.POLICIES[("cuda", "quick")])
    assert timing.median_s == pytest.approx(1e-3)
    assert entered == [device]
    assert recorded and all(stream == ("stream of", device) for stream in recorded)


def test_interpreter_is_refused_on_a_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET"):
        cli.refuse_interpreter_on_gpu(torch.device("cuda"))
    cli.refuse_interpreter_on_gpu(torch.device("cpu"))  # on CPU it only warns, later


def test_l2_flush_reads_and_does_not_write():
    """The flush reads its buffer (clean lines), it does not fill it (dirty lines to write back later)."""
    from benchmarks.suite.harness import L2Flusher

    flusher = L2Flusher(torch.device("cpu"))
    assert flusher.buffer is None
    flusher()  # a no-op on CPU
    flusher.buffer = torch.arange(1, 9, dtype=torch.int32)  # what a GPU flusher holds, here on CPU
    flusher()
    assert torch.equal(flusher.buffer, torch.arange(1, 9, dtype=torch.int32))
