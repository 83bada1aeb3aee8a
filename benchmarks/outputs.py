"""Writes a run's results: results.csv, results.json, kernel_report.csv and summary.md.

results.csv has one row per (op, mode, shape, provider) with the shape's
dimensions as their own columns; results.json holds the same rows plus the
machine metadata, the measured ceilings and the kernel report.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .tables import headline_table, kernel_report_table, op_mode_table, render_markdown

CSV_COLUMNS = ["op", "mode", "provider", "role", "shape", "tokens", "dtype", "device", "status", "median_ms", "q25_ms",
               "q75_ms", "iqr_pct", "reps", "overhead", "fastpeft_speedup", "gflops", "pct_peak_flops", "gbps",
               "pct_peak_bw", "saved_mb", "peak_mb", "rel_err", "first_call_s", "note"]


def write_csv(path: Path, rows: list) -> None:
    dim_keys = list(dict.fromkeys(k for r in rows for k in r["dims"] if k not in CSV_COLUMNS))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS[:6] + dim_keys + CSV_COLUMNS[6:], extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            row = {**{k: v for k, v in r["dims"].items() if k not in CSV_COLUMNS}, **r}
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def write_json(path: Path, meta: dict, ceilings: dict, rows: list, kernel_report: dict) -> None:
    path.write_text(json.dumps({"metadata": meta, "ceilings": ceilings, "results": rows,
                                "kernel_report": kernel_report}, indent=1, default=str))


def write_kernel_report_csv(path: Path, report: dict) -> None:
    rows = report.get("rows") or []
    if not rows:
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "problems": "; ".join(r["problems"])})


def summary_markdown(ops: list, rows: list, meta: dict, ceilings: dict, report: dict, plots: list) -> str:
    threads = f", {meta['torch_threads']} threads" if meta["device"] == "cpu" else ""
    out = [
        "# fastpeft benchmark summary",
        "",
        f"Machine: {meta['device_name']} ({meta['device']}{threads}), {meta['dtype']}; "
        f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, peft {meta['versions']['peft']}, "
        f"bitsandbytes {meta['versions']['bitsandbytes']}; fastpeft backend `{meta['fastpeft_backend']}`; "
        f"commit `{meta['git_commit']}`; {meta['timestamp_utc']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Ceilings measured in this run: copy {ceilings['copy_gbps']:.1f} GB/s (read + write), "
        f"read {ceilings['read_gbps']:.1f} GB/s, "
        f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_gflops']:.0f} GFLOP/s "
        f"({ceilings['matmul_size']}³).",
        "",
        "Times are medians (± interquartile range). `p/base` is provider p's time over the frozen base layer's "
        "(LoRA overhead; for NF4 the dense layer); `peer/fastpeft` is fastpeft's speedup over that peer; "
        "roofline is fastpeft's share of the measured matmul (flop) or bandwidth (mem: the larger of copy and read) "
        "ceiling, whichever is larger (over 100%: the data came from cache); "
        "saved MB is the activation memory autograd keeps for backward.",
    ]
    for op in ops:
        if op.headline and any(r["op"] == op.name for r in rows):
            header, body = headline_table(op, rows)
            out += ["", f"## Headline: {op.title}", "", render_markdown(header, body)]
    for op in ops:
        for mode in op.modes:
            header, body, notes = op_mode_table(op, mode, rows)
            if not body:
                continue
            out += ["", f"## {op.title}: {mode}", "", render_markdown(header, body)]
            if notes:
                out += [""] + [f"- {n}" for n in notes]
    out += ["", "## Ahead-of-time kernel report (sm_80, sm_90)", ""]
    if "rows" in report:
        header, body = kernel_report_table(report["rows"])
        if report.get("reused_from"):
            out += [f"Reused from {report['reused_from']}: kernel sources unchanged (fingerprint "
                    f"`{report['fingerprint']}`).", ""]
        out.append(render_markdown(header, body))
    else:
        out.append(f"Not included: {report.get('unavailable', 'not run')}.")
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"
