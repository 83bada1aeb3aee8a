"""``python -m benchmarks``: run the suite on this machine, print tables, write results and plots.

The device is the GPU when torch sees one, else the CPU (``--device`` picks);
the default level fits in a few minutes on a 2-core CPU, ``--quick`` is a smoke
run, ``--full`` adds ranks and shapes. Exit status 1 when a fastpeft provider
raised or disagreed with the reference, 0 otherwise.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from . import machine
from .ceilings import measure_ceilings
from .harness import POLICIES
from .kernel_report import kernel_report
from .ops import OP_MODULES, load_ops
from .outputs import summary_markdown, write_csv, write_json, write_kernel_report_csv
from .plots import plot_all
from .runner import failures_in, plan, run_task, selected_providers
from .spec import MODES
from .tables import headline_table, kernel_report_table, op_mode_table, render_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def _int_list(text: str) -> list:
    return [int(v) for v in text.split(",") if v]


def _dims(text: str) -> dict:
    """``K=1024,N=1024,r=16`` (``K=N=1024`` sets both) -> dict of ints."""
    out = {}
    for part in text.split(","):
        *keys, value = part.split("=")
        if not keys:
            raise argparse.ArgumentTypeError(f"{part!r} is not KEY=VALUE")
        for key in keys:
            out[key.strip()] = int(value)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    level = p.add_mutually_exclusive_group()
    level.add_argument("--quick", dest="level", action="store_const", const="quick", help="smallest shapes, few reps")
    level.add_argument("--full", dest="level", action="store_const", const="full", help="more ranks and shapes")
    p.set_defaults(level="default")
    p.add_argument("--op", nargs="+", choices=OP_MODULES, help="ops to run (default: all)")
    p.add_argument("--providers", nargs="+", help="providers to run (the baseline and reference always run)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="modes to run (default: each op's modes)")
    p.add_argument("--tokens", type=_int_list, help="token counts, e.g. 1,16,2048 (replaces the level's)")
    p.add_argument("--dims", type=_dims, action="append",
                   help="shape group, e.g. K=N=1024,r=16 (repeatable; replaces the level's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<device tag>)")
    p.add_argument("--no-kernel-report", action="store_true", help="skip the ahead-of-time kernel report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _echo(progress, text: str) -> None:
    if progress is not None:
        progress.write(text)
    else:
        print(text, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = machine.choose_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else machine.default_dtype(device)
    policy = POLICIES[(device.type, args.level)]
    out_dir = args.out or RESULTS_ROOT / machine.device_tag(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = machine.metadata(device, dtype, shlex.join(["python", "-m", "benchmarks", *argv]))
    meta["level"] = args.level
    started = time.perf_counter()

    print(f"fastpeft benchmarks: {meta['device_name']} ({device}, threads={meta['torch_threads']}), "
          f"{meta['dtype']}, level {args.level}, fastpeft backend {meta['fastpeft_backend']}", flush=True)
    if device.type == "cpu" and meta["triton_interpret"] == "1":
        print("WARNING: TRITON_INTERPRET=1: fastpeft may run its Triton kernels in the interpreter; "
              "these times say nothing about speed.", flush=True)

    ops = load_ops(args.op)
    tasks = plan(ops, device.type, args.level, args.modes, args.tokens, args.dims)
    providers = {op.name: selected_providers(op, args.providers) for op in ops}

    print("measuring ceilings (big copy, big read, big matmul)...", flush=True)
    ceilings = measure_ceilings(device, dtype, args.level, policy)
    print(f"  copy {ceilings.copy_gbps:.1f} GB/s, read {ceilings.read_gbps:.1f} GB/s, {ceilings.matmul_dtype} matmul "
          f"{ceilings.matmul_gflops:.0f} GFLOP/s", flush=True)

    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=sum(len(providers[t.op.name]) for t in tasks), unit="run", dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal
    rows = []
    for i, task in enumerate(tasks):
        if progress is not None and progress.disable:  # not a terminal: one plain line per task instead
            print(f"[{i + 1}/{len(tasks)}] {task.op.name} {task.mode} {task.op.shape_label(task.shape)}", flush=True)
        rows += run_task(task, providers[task.op.name], device, dtype, policy, ceilings, progress)
        if i + 1 == len(tasks) or tasks[i + 1].op is not task.op:
            _print_op(task.op, rows, dtype, device, meta, progress)
    if progress is not None:
        progress.close()
    for op in ops:
        if op.headline and any(r["op"] == op.name for r in rows):
            print(f"\nHeadline: {op.title}\n" + render_text(*headline_table(op, rows)), flush=True)

    report = {"unavailable": "skipped (--no-kernel-report)"}
    if not args.no_kernel_report:
        print("kernel report (sm_80, sm_90): compiling, or reusing an unchanged one...", flush=True)
        report = kernel_report(out_dir / "results.json")
    _print_kernel_report(report)

    meta["wall_s"] = round(time.perf_counter() - started, 1)
    plots = plot_all(rows, [{"name": op.name, "title": op.title, "modes": op.modes} for op in ops], out_dir,
                     f"{meta['device_name']}, {meta['dtype']}")
    write_csv(out_dir / "results.csv", rows)
    write_json(out_dir / "results.json", meta, ceilings.as_dict(), rows, report)
    write_kernel_report_csv(out_dir / "kernel_report.csv", report)
    (out_dir / "summary.md").write_text(summary_markdown(ops, rows, meta, ceilings.as_dict(), report, plots))
    print(f"\nwrote {out_dir}/results.csv, results.json, summary.md" + "".join(f", {p.name}" for p in plots)
          + f" in {meta['wall_s']:.0f} s", flush=True)

    failures = failures_in(rows)
    for r in failures:
        print(f"FAILED: {r['op']} {r['mode']} {r['shape']} {r['provider']}: {r['status']}: {r['note']}",
              file=sys.stderr)
    return 1 if failures else 0


def _print_op(op, rows, dtype, device, meta, progress) -> None:
    threads = f", threads={meta['torch_threads']}" if device.type == "cpu" else ""
    for mode in op.modes:
        header, body, notes = op_mode_table(op, mode, rows)
        if not body:
            continue
        text = [f"\n{op.title} - {mode} - {str(dtype).replace('torch.', '')} on {device}{threads}",
                render_text(header, body)] + [f"  {n}" for n in notes]
        _echo(progress, "\n".join(text))


def _print_kernel_report(report: dict) -> None:
    if "rows" in report:
        header, body = kernel_report_table(report["rows"])
        origin = (f"reused from {report['reused_from']}, same kernel sources" if report.get("reused_from")
                  else f"{report['seconds']:.0f} s to compile")
        print(f"\nAhead-of-time kernel report ({origin})\n" + render_text(header, body))
    else:
        print(f"\nkernel report not included: {report['unavailable']}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
