"""``python -m benchmarks``: run the suite on this machine, print tables, write results and plots.

The device is the GPU when torch sees one, else the CPU (``--device`` picks);
the default level fits in a few minutes on a 2-core CPU, ``--quick`` is a smoke
run, ``--full`` adds ranks and shapes. Each run writes a new folder
(``benchmarks/results/<device tag>-<UTC time>/``, ignored by git, or ``--out``)
and touches nothing else unless asked (``--update-readme``). Per-op tables print
as each op finishes; the headline tables and any warning about flagged headline
rows print last. Exit status 1 when a fastpeft provider raised or disagreed
with the float64 reference, 0 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..models import train_step
from ..ops import OP_MODULES, load_ops
from ..report import readme
from ..report import train_step as train_step_report
from ..report.outputs import (flag_lines, headline_sections, summary_markdown, train_step_sections, write_csv,
                              write_json, write_kernel_report_csv)
from ..report.plots import plot_all
from ..report.tables import LEGEND, dtypes_in, kernel_report_line, op_mode_table, render_text
from . import machine
from .ceilings import matmul_text, measure_ceilings
from .harness import POLICIES
from .kernel_report import kernel_report, previous_results
from .runner import (DTYPES, add_flags, add_speedups, failures_in, flagged, headline_rows, plan, run_task,
                     selected_providers)
from .spec import MODES

RESULTS_ENV = "FASTPEFT_BENCH_RESULTS"  # folder that new run folders go in (default benchmarks/results)
RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results"


def results_root() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or RESULTS_ROOT)


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
    p.add_argument("--op", nargs="+", choices=OP_MODULES + (train_step.OP_NAME,),
                   help=f"ops to run (default: all); {train_step.OP_NAME} is one training step of a whole model "
                        f"per PEFT method vs its peer (CPU)")
    p.add_argument("--providers", nargs="+", help="providers to run (the baseline and reference always run)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="modes to run (default: each op's modes)")
    p.add_argument("--tokens", type=_int_list, help="token counts, e.g. 1,16,2048 (replaces the level's)")
    p.add_argument("--dims", type=_dims, action="append",
                   help="shape group, e.g. K=N=1024,r=16 (repeatable; replaces the level's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES,
                   help="input dtypes to run (default: each op's; CPU: float32 and bfloat16 for lora, nf4 and qlora, "
                        "float32 otherwise; CUDA: bfloat16)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--out", type=Path,
                   help=f"output folder (default: a new benchmarks/results/<device tag>-<UTC time>/, or under "
                        f"${RESULTS_ENV}); --out benchmarks/results/<tag> replaces a committed set")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite README.md's benchmark block (headline tables) from this run; needs "
                        "--out benchmarks/results/<tag>")
    report = p.add_mutually_exclusive_group()
    report.add_argument("--kernel-report", dest="kernel_report", action="store_true", default=None,
                        help="compile the ahead-of-time kernel report (default: only on a GPU machine)")
    report.add_argument("--no-kernel-report", dest="kernel_report", action="store_false",
                        help="skip the ahead-of-time kernel report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu-time", action="store_true",
                   help=f"{train_step.OP_NAME}: time steps by the process's CPU time instead of wall time (steadier "
                        f"on a loaded machine; with --threads 1 it is the one thread's time)")
    return p.parse_args(argv)


def _echo(progress, text: str) -> None:
    if progress is not None:
        progress.write(text)
    else:
        print(text, flush=True)


def new_run_folder(device: torch.device) -> Path:
    root = results_root()
    out = root / machine.run_folder_name(device)
    n = 1
    while out.exists():  # two runs in one second
        n += 1
        out = root / f"{machine.run_folder_name(device)}-{n}"
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = machine.choose_device(args.device)
    refuse_interpreter_on_gpu(device)
    out_dir = args.out or new_run_folder(device)
    readme_target = readme.check_target(out_dir, device.type) if args.update_readme and args.op != [
        train_step.OP_NAME] else None
    policy = POLICIES[(device.type, args.level)]
    run_train_step = args.op is None or train_step.OP_NAME in args.op
    kernel_ops = None if args.op is None else [n for n in args.op if n != train_step.OP_NAME]
    ops = load_ops(kernel_ops) if kernel_ops != [] else []
    if run_train_step and device.type != "cpu":
        print(f"{train_step.OP_NAME}: skipped on {device.type} (the training-step level runs on a CPU)", flush=True)
        run_train_step = False
    if args.update_readme and run_train_step:
        readme.check_target(out_dir, readme.train_step_key(device.type))
    tasks = plan(ops, device.type, args.level, args.modes, args.tokens, args.dims,
                 machine.default_dtype(device), args.dtype)
    train_dtypes = [d for d in (args.dtype or train_step.DTYPES) if d in train_step.DTYPES] if run_train_step else []
    dtypes = list(dict.fromkeys([t.dtype for t in tasks] + [DTYPES[d] for d in train_dtypes]))
    dtype_names = [str(d).replace("torch.", "") for d in dtypes]
    providers = {op.name: selected_providers(op, args.providers) for op in ops}
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = machine.metadata(device, dtype_names, shlex.join(["python", "-m", "benchmarks", *argv]))
    meta["level"] = args.level
    meta["ops"] = [{"name": op.name, "title": op.title, "modes": list(op.modes)} for op in ops]
    started = time.perf_counter()

    print(f"fastpeft benchmarks: {meta['device_name']} ({device}, threads={meta['torch_threads']}), "
          f"{', '.join(dtype_names)}, level {args.level}, fastpeft backend {meta['fastpeft_backend']}; "
          f"writing {out_dir}", flush=True)
    _warn_about_machine(device, meta)

    print("measuring ceilings (big copy, big read, big matmul)...", flush=True)
    ceilings = measure_ceilings(device, dtypes, args.level, policy)
    print(f"  copy {ceilings.copy_gbps:.1f} GB/s, read {ceilings.read_gbps:.1f} GB/s, "
          f"{matmul_text(ceilings.as_dict())}", flush=True)

    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=sum(len(providers[t.op.name]) for t in tasks), unit="run", dynamic_ncols=True,
                        disable=None)  # None: no bar when stderr is not a terminal
    rows = []
    for i, task in enumerate(tasks):
        if progress is not None and progress.disable:  # not a terminal: one plain line per task instead
            print(f"[{i + 1}/{len(tasks)}] {task.op.name} {task.mode} {str(task.dtype).replace('torch.', '')} "
                  f"{task.op.shape_label(task.shape)}", flush=True)
        rows += run_task(task, providers[task.op.name], device, policy, ceilings, progress)
        if i + 1 == len(tasks) or tasks[i + 1].op is not task.op:
            add_flags([r for r in rows if r["op"] == task.op.name])
            add_speedups(task.op, rows)
            _print_op(task.op, rows, device, meta, progress)
    if progress is not None:
        progress.close()
    if run_train_step:
        print(f"\n{train_step.OP_NAME}: {train_step.TITLE}, interleaved rounds...", flush=True)
        rows += train_step.run(args.level, train_dtypes, progress=None if args.no_progress else (
            lambda text: print(f"  {text}", flush=True)), clock=time.process_time if args.cpu_time else time.perf_counter)

    report = _kernel_report(args.kernel_report, device, out_dir)
    _remove_previous_outputs(out_dir)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["load_avg_after"] = machine.load_average()
    plots = plot_all(rows, meta["ops"], out_dir, meta["device_name"])
    flagged_headline = flagged(headline_rows(ops, rows))
    write_csv(out_dir / "results.csv", rows)
    write_json(out_dir / "results.json", meta, ceilings.as_dict(), rows, report)
    write_kernel_report_csv(out_dir / "kernel_report.csv", report)
    (out_dir / "summary.md").write_text(summary_markdown(ops, rows, meta, ceilings.as_dict(), report, plots,
                                                         flagged_headline))
    print("\n" + kernel_report_line(report, out_dir / "kernel_report.csv" if "rows" in report else None), flush=True)
    print(f"wrote {out_dir}/results.csv, results.json, summary.md" + "".join(f", {p.name}" for p in plots)
          + f" in {meta['wall_s']:.0f} s", flush=True)
    if readme_target is not None:
        readme.write(device.type, readme.block(readme_target, meta, ceilings.as_dict(),
                                               headline_sections(ops, rows), len(flagged_headline)))
        print(f"rewrote the {device.type} benchmark block of {readme.README} from {readme_target}", flush=True)
    if args.update_readme and run_train_step:
        key = readme.train_step_key(device.type)
        readme.write(key, readme.block(readme.check_target(out_dir, key), meta, None, train_step_sections(rows),
                                       what="training-step result set"))
        print(f"rewrote the {key} benchmark block of {readme.README}", flush=True)

    _print_headlines(ops, rows)
    _print_train_step(rows)
    for line in flag_lines(flagged_headline, limit=10, where=f" (all in {out_dir / 'summary.md'})"):
        print(line, flush=True)
    failures = failures_in(rows)
    for r in failures:
        print(f"FAILED: {r['op']} {r['mode']} {r['dtype']} {r['shape']} {r['provider']}: {r['status']}: {r['note']}",
              file=sys.stderr)
    return 1 if failures else 0


def _remove_previous_outputs(out_dir: Path) -> None:
    """Files an earlier run left in ``out_dir`` that this one may not write again (a replaced committed set)."""
    for path in [out_dir / n for n in ("results.csv", "results.json", "summary.md", "kernel_report.csv")] + sorted(
            out_dir.glob("speedup_*.png")):
        path.unlink(missing_ok=True)


def refuse_interpreter_on_gpu(device) -> None:
    """On a GPU, TRITON_INTERPRET=1 would time the interpreter: refuse instead of printing numbers."""
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("TRITON_INTERPRET=1 runs fastpeft's Triton kernels in the interpreter; unset it to "
                         "benchmark on a GPU")


def _warn_about_machine(device, meta) -> None:
    if device.type == "cpu" and meta["triton_interpret"] == "1":
        print("WARNING: TRITON_INTERPRET=1: fastpeft may run its Triton kernels in the interpreter; "
              "these times say nothing about speed.", flush=True)
    load = meta.get("load_avg_before")
    if device.type == "cpu" and load and load[0] > 0.5 * (meta["cpu_count"] or 1):
        print(f"WARNING: load average {load[0]:.2f} on {meta['cpu_count']} CPUs: other work is running; "
              f"times will be noisy.", flush=True)


def _kernel_report(asked, device, out_dir: Path) -> dict:
    if asked is False:
        return {"unavailable": "skipped (--no-kernel-report)"}
    if asked is None and device.type != "cuda":
        return {"unavailable": "skipped on a machine without a GPU (--kernel-report runs it)"}
    print("kernel report (sm_80, sm_90): compiling, or reusing an unchanged one...", flush=True)
    return kernel_report(previous_results(out_dir, RESULTS_ROOT, results_root()))


def _print_op(op, rows, device, meta, progress) -> None:
    threads = f", threads={meta['torch_threads']}" if device.type == "cpu" else ""
    for dtype in dtypes_in(rows, op.name):
        for mode in op.modes:
            header, body, notes = op_mode_table(op, mode, rows, dtype)
            if not body:
                continue
            text = [f"\n{op.title} - {mode} - {dtype} on {device}{threads}",
                    render_text(header, body)] + [f"  {n}" for n in notes]
            _echo(progress, "\n".join(text))


def _print_train_step(rows) -> None:
    if not train_step_report.dtypes_in(rows):
        return
    for dtype in train_step_report.dtypes_in(rows):
        header, body, notes = train_step_report.table(rows, dtype)
        print(f"\n{train_step_report.title(dtype)}\n" + render_text(header, body)
              + "".join(f"\n  {n}" for n in notes), flush=True)
    print(f"\n{train_step_report.LEGEND}", flush=True)


def _print_headlines(ops, rows) -> None:
    sections = headline_sections(ops, rows, render_text)
    for title, table in sections:
        print(f"\nHeadline: {title}\n" + table, flush=True)
    if sections:
        print(f"\n{LEGEND}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
