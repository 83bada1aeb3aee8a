"""Writes a run's results: results.csv, results.json, kernel_report.csv and summary.md.

results.csv has one row per (op, mode, dtype, shape, provider) with the
shape's dimensions as their own columns; results.json holds the same rows plus
the machine metadata (load average before and after the run included), the
measured ceilings and the kernel report. summary.md has the headline tables
(one per op and input dtype), a warning listing flagged headline rows, the
per-(op, mode, dtype) tables, the kernel report's one-line summary (and the
configs with problems) and the plots.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..suite.ceilings import matmul_text
from ..suite.runner import ABOVE_CEILING, NOISY
from . import train_step
from .tables import (LEGEND, dtypes_in, headline_table, headline_title, kernel_report_line, kernel_report_table,
                     op_mode_table, render_markdown)

CSV_COLUMNS = ["op", "mode", "provider", "role", "shape", "tokens", "dtype", "device", "status", "median_ms", "q25_ms",
               "q75_ms", "iqr_pct", "reps", "rel_err", "compute_dtype", "overhead", "fastpeft_speedup", "speedup_vs",
               "speedup_same_inputs", "gflops", "pct_peak_flops", "gbps", "pct_peak_bw", "saved_mb", "peak_mb", "flags",
               "first_call_s", "note"]


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


def machine_line(meta: dict) -> str:
    threads = f", {meta['torch_threads']} threads" if meta["device"] == "cpu" else ""
    load = ""
    if meta.get("load_avg_before") and meta.get("load_avg_after"):
        load = (f"; load average (1, 5, 15 min) {_load(meta['load_avg_before'])} before, "
                f"{_load(meta['load_avg_after'])} after, on {meta['cpu_count']} CPUs")
    return (f"Machine: {meta['device_name']} ({meta['device']}{threads}), {', '.join(meta['dtypes'])}; "
            f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, peft {meta['versions']['peft']}, "
            f"bitsandbytes {meta['versions']['bitsandbytes']}; fastpeft backend `{meta['fastpeft_backend']}`; "
            f"commit `{meta['git_commit']}`; {meta['timestamp_utc']}{load}.")


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def ceilings_line(ceilings: dict) -> str:
    cache = ""
    if ceilings.get("cache_bytes") and ceilings.get("cache_read_gbps"):
        cache = (f", reads resident in the {ceilings['cache_bytes'] / 2**20:.0f} MiB last-level cache "
                 f"{ceilings['cache_read_gbps']:.1f} GB/s (the ceiling of rows moving at most half of it)")
    return (f"Ceilings measured in this run: copy {ceilings['copy_gbps']:.1f} GB/s (read + write), "
            f"read {ceilings['read_gbps']:.1f} GB/s{cache}, {matmul_text(ceilings)}.")


def flag_lines(flagged_headline: list, limit: int = None, where: str = "") -> list:
    """Lines that say which headline rows are flagged and why (at most ``limit`` rows); empty when none is."""
    if not flagged_headline:
        return []
    out = [f"WARNING: {len(flagged_headline)} headline row(s) flagged (noisy: IQR above 10% of the median, rerun on "
           f"a quiet machine; or faster than a measured ceiling: a lower precision or a timing to distrust) — check "
           f"them before quoting them{where}:"]
    shown = flagged_headline if limit is None else flagged_headline[:limit]
    out += [f"- {r['op']} {r['mode']} {r['dtype']} {r['shape']} {r['provider']}: {_why(r)}" for r in shown]
    if len(shown) < len(flagged_headline):
        out.append(f"- ... and {len(flagged_headline) - len(shown)} more")
    return out


def _why(row: dict) -> str:
    reasons = []
    if NOISY in row["flags"]:
        reasons.append(f"noisy (IQR ±{row['iqr_pct']:.0f}%)")
    if ABOVE_CEILING in row["flags"]:
        if row["pct_peak_flops"] > 100:
            reasons.append(f"{row['pct_peak_flops']:.0f}% of the {row['dtype']} matmul ceiling")
        if row["pct_peak_bw"] > 100:
            reasons.append(f"{row['pct_peak_bw']:.0f}% of the bandwidth ceiling")
    return ", ".join(reasons)


def headline_sections(ops: list, rows: list, render=render_markdown) -> list:
    """``[(title, table)]``: one headline table per op with headline providers and per input dtype, drawn by
    ``render(header, body)`` (markdown for files, ``render_text`` for the terminal)."""
    out = []
    for op in ops:
        if not op.headline:
            continue
        for dtype in dtypes_in(rows, op.name):
            header, body = headline_table(op, rows, dtype)
            if body:
                out.append((headline_title(op, dtype), render(header, body)))
    return out


def train_step_sections(rows: list) -> list:
    """``[(title, markdown table with its notes)]``: the training-step level, one table per dtype."""
    out = []
    for dtype in train_step.dtypes_in(rows):
        header, body, notes = train_step.table(rows, dtype)
        text = render_markdown(header, body) + "".join(f"\n- {n}" if i else f"\n\n- {n}" for i, n in enumerate(notes))
        out.append((train_step.title(dtype), text))
    return out


HEADLINE_EXPLAINED = (
    "Headline tables, one per op and input dtype: per mode, the frozen base layer's time, fastpeft's time over it "
    "(`fastpeft/base`, the overhead; for NF4 the dense layer), and fastpeft's speedup over each other provider at "
    "equal precision (`peer/fastpeft`: peer time over fastpeft time when both compute at the same precision; "
    "above 1, fastpeft is faster).")


def summary_markdown(ops: list, rows: list, meta: dict, ceilings: dict, report: dict, plots: list,
                     flagged_headline: list = ()) -> str:
    out = [
        "# fastpeft benchmark summary",
        "",
        machine_line(meta),
        "",
        f"Command: `{meta['command']}`",
        "",
        ceilings_line(ceilings),
        "",
        "Times are medians (± interquartile range). `p/base` is provider p's time over the frozen base layer's "
        "(LoRA overhead; for NF4 the dense layer); `peer/fastpeft` is fastpeft's speedup over that peer at equal "
        "precision; roofline is fastpeft's share of the measured matmul (flop) or bandwidth (mem: the larger of copy "
        "and read, or cache-resident reads when the call's bytes fit in half the last-level cache) ceiling, "
        "whichever is larger (over 100%: faster than this machine's measured best, so check the row); `err` is the relative error "
        "of the forward output against a float64 reference; saved MB is the activation memory autograd keeps for "
        "backward.",
        "",
        LEGEND,
        "",
        HEADLINE_EXPLAINED,
    ]
    if flagged_headline:
        out += [""] + flag_lines(flagged_headline)
    for title, table in headline_sections(ops, rows):
        out += ["", f"## Headline: {title}", "", table]
    sections = train_step_sections(rows)
    if sections:
        out += ["", train_step.LEGEND]
    for title, table in sections:
        out += ["", f"## Headline: {title}", "", table]
    for op in ops:
        for dtype in dtypes_in(rows, op.name):
            for mode in op.modes:
                header, body, notes = op_mode_table(op, mode, rows, dtype)
                if not body:
                    continue
                out += ["", f"## {op.title}: {mode}, {dtype}", "", render_markdown(header, body)]
                if notes:
                    out += [""] + [f"- {n}" for n in notes]
    out += ["", "## Ahead-of-time kernel report (sm_80, sm_90)", "", kernel_report_line(report, "kernel_report.csv")
            + "."]
    problems = [r for r in report.get("rows", []) if r["problems"]]
    if problems:
        header, body = kernel_report_table(problems)
        out += ["", render_markdown(header, body)]
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"
