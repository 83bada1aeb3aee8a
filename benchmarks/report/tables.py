"""Result rows as tables: one per (op, mode, input dtype), for the terminal and for markdown.

Columns: each provider's median time (± interquartile range in % of the
median), then ratios of times: ``p/base`` is the overhead of provider p over
the op's baseline (the frozen base layer, same inputs), ``peer/fastpeft`` is
fastpeft's speedup over a peer at equal precision (above 1: fastpeft is
faster; see ``runner.add_speedups``). Then fastpeft's place on the roofline
(the larger of its fractions of the measured matmul and bandwidth ceilings),
each provider's relative error against the float64 reference, and in
forward+backward mode the activation memory each provider saves for backward.

Marks in the cells (``LEGEND``): ``[bf16]`` after a time is the dtype a
provider effectively computed in when it is not its input dtype; ``[vs bf16]``
after a speedup says it divides by fastpeft run in bfloat16 (the peer's
precision) rather than in the table's dtype; ``~`` marks a noisy time (IQR
over 10% of the median), ``^`` a time faster than a measured ceiling.
"""
from __future__ import annotations

from ..suite.precision import same_precision, short
from ..suite.runner import ABOVE_CEILING, ERROR, NOISY, NOT_AVAILABLE, OK, WRONG
from ..suite.spec import FORWARD_BACKWARD

LEGEND = ("`[bf16]` after a time: the dtype the provider effectively computed in (read off its error against "
          "float64), when it differs from its input dtype. `peer/fastpeft` compares fastpeft and the peer at equal "
          "precision: `[vs bf16]` means the peer computed in bf16 and is compared with fastpeft run on bf16 inputs; "
          "`n/a [bf16]`: no fastpeft row at that precision in this run. "
          "`~`: noisy, interquartile range above 10% of the median. "
          "`^`: faster than a ceiling measured in this run (matmul in the input dtype, or the bandwidth "
          "of the memory level the call's bytes fit in): a lower precision, or a timing to distrust.")
_MARKS = {NOISY: "~", ABOVE_CEILING: "^"}


def fmt_num(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def flag_marks(*rows) -> str:
    """``~``/``^`` for the flags of ``rows`` (None ignored): a ratio carries the marks of both its times."""
    flags = {f for row in rows if row for f in (row.get("flags") or "").split("; ") if f}
    return "".join(mark for flag, mark in _MARKS.items() if flag in flags)


def _ratio_marks(row, other=None) -> str:
    """Marks of a ratio cell: the row's flags, ``other``'s, and those of the fastpeft row it divides by."""
    if row is None or row.get("status") != OK:
        return ""
    vs = {"flags": row.get("speedup_vs_flags", "")}
    return flag_marks(row, other, vs)


def _time_cell(row) -> str:
    if row is None:
        return "-"
    if row["status"] == OK:
        text = f"{fmt_num(row['median_ms'])} ±{row['iqr_pct']:.0f}%{flag_marks(row)}"
        compute = row.get("compute_dtype")
        if compute and not same_precision(compute, row["dtype"]):
            text += f" [{short(compute)}]"
        return text
    return {NOT_AVAILABLE: "n/a", ERROR: "ERROR", WRONG: "WRONG"}.get(row["status"], row["status"])


def _ratio_cell(row, key) -> str:
    if row is None or row["status"] != OK or key not in row:
        return "-"
    return f"{row[key]:.2f}x"


def _speedup_cell(row) -> str:
    """fastpeft's speedup over a peer at equal precision, marked when the fastpeft row has other inputs."""
    if row is None or row["status"] != OK:
        return "-"
    vs = row.get("speedup_vs", "")
    if row.get("fastpeft_speedup") is None:
        compute = row.get("compute_dtype")
        return f"n/a [{short(compute)}]" if compute else "-"
    text = f"{row['fastpeft_speedup']:.2f}x"
    return text if vs == row["dtype"] else f"{text} [vs {short(vs)}]"


def _roofline_cell(row) -> str:
    if row is None or row["status"] != OK:
        return "-"
    if row["pct_peak_flops"] >= row["pct_peak_bw"]:
        return f"{row['pct_peak_flops']:.0f}% flop"
    return f"{row['pct_peak_bw']:.0f}% mem"


def _err_cell(row) -> str:
    if row is None or row["status"] != OK or row.get("rel_err") is None:
        return "-"
    return f"{row['rel_err']:.1e}"


def _mb_cell(row) -> str:
    if row is None or row.get("saved_mb") is None:
        return "-"
    return f"{row['saved_mb']:.2f}"


def dtypes_in(rows: list, op_name: str) -> list:
    """Input dtypes of ``op_name``'s rows, in run order."""
    return list(dict.fromkeys(r["dtype"] for r in rows if r["op"] == op_name))


def op_mode_table(op, mode: str, rows: list, dtype: str) -> tuple:
    """``(header, body, notes)`` for one op, mode and input dtype; ``rows`` may hold any rows."""
    rows = [r for r in rows if r["op"] == op.name and r["mode"] == mode and r["dtype"] == dtype]
    providers = [p.name for p in op.providers if any(r["provider"] == p.name for r in rows)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cell = {(r["shape"], r["provider"]): r for r in rows}
    others = [p for p in providers if p != op.baseline]
    peers = [p for p in providers if p not in (op.baseline, op.ours)]
    has_ours = op.ours in providers
    header = ["shape"] + [f"{p} ms" for p in providers]
    if op.baseline in providers:
        header += [f"{p}/{op.baseline}" for p in others]
    if has_ours:
        header += [f"{p}/{op.ours}" for p in peers] + [f"{op.ours} roofline"]
    header += [f"{p} err" for p in providers]
    if mode == FORWARD_BACKWARD:
        header += [f"{p} saved MB" for p in providers]
    body = []
    for shape in shapes:
        line = [shape] + [_time_cell(cell.get((shape, p))) for p in providers]
        if op.baseline in providers:
            line += [_ratio_cell(cell.get((shape, p)), "overhead") for p in others]
        if has_ours:
            line += [_speedup_cell(cell.get((shape, p))) for p in peers]
            line += [_roofline_cell(cell.get((shape, op.ours)))]
        line += [_err_cell(cell.get((shape, p))) for p in providers]
        if mode == FORWARD_BACKWARD:
            line += [_mb_cell(cell.get((shape, p))) for p in providers]
        body.append(line)
    notes = []
    for r in rows:
        if r["status"] != OK or r.get("note"):
            status = f"{r['status']}: " if r["status"] != OK else ""
            note = f"{r['provider']}: {status}{r['note']}"
            if note not in notes:
                notes.append(note)
    return header, body, notes


SHORT_MODES = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}


def headline_table(op, rows: list, dtype: str) -> tuple:
    """``(header, body)`` for one op and input dtype: per shape and mode, the baseline's time,
    fastpeft's overhead over it, and fastpeft's speedup over each other headline provider at equal precision."""
    rows = [r for r in rows if r["op"] == op.name]
    modes = [m for m in op.modes if any(r["mode"] == m and r["dtype"] == dtype for r in rows)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["dtype"] == dtype))
    cell = {(r["shape"], r["mode"], r["provider"]): r for r in rows if r["dtype"] == dtype}
    present = {r["provider"] for r in rows if r["dtype"] == dtype}
    header, columns = ["shape"], []
    for mode in modes:
        m = SHORT_MODES.get(mode, mode)
        for p in (p for p in op.headline if p in present):
            if p == op.baseline:
                header.append(f"{m} {p} ms")
                columns.append((mode, p, lambda row, base: _time_cell(row)))
            elif p == op.ours:
                header.append(f"{m} {p}/{op.baseline}")
                columns.append((mode, p, lambda row, base: _ratio_cell(row, "overhead") + _ratio_marks(row, base)))
            else:
                header.append(f"{m} {p}/{op.ours}")
                columns.append((mode, p, lambda row, base: _speedup_cell(row) + _ratio_marks(row)))
    body = []
    for shape in shapes:
        body.append([shape] + [fmt(cell.get((shape, mode, p)), cell.get((shape, mode, op.baseline)))
                               for mode, p, fmt in columns])
    return header, body


def headline_title(op, dtype: str) -> str:
    return f"{op.title}, {dtype}"


def render_text(header: list, body: list) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def line(cells):
        first = str(cells[0]).ljust(widths[0])
        return "  ".join([first] + [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])])

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body])


def render_markdown(header: list, body: list) -> str:
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
                     + [line(b) for b in body])


def kernel_report_table(rows: list) -> tuple:
    header = ["kernel", "arch", "warps", "stages", "regs", "spill B", "smem KB", "tensor core", "problems"]
    body = [[f"{r['module'].rsplit('.', 1)[-1]}.{r['name']}", f"sm_{r['arch']}", r["num_warps"], r["num_stages"],
             r["registers"], r["spills"], f"{r['shared_bytes'] / 1024:.1f}", r["tensor_core"],
             "; ".join(r["problems"]) or "-"] for r in rows]
    return header, body


def kernel_report_line(report: dict, csv_path=None) -> str:
    """The kernel report in one line: configs compiled, how many have problems, where the details are."""
    if "rows" not in report:
        return f"kernel report not included: {report.get('unavailable', 'not run')}"
    rows = report["rows"]
    kernels = {(r["module"], r["name"]) for r in rows}
    arches = sorted({r["arch"] for r in rows})
    bad = [r for r in rows if r["problems"]]
    origin = (f"reused from {report['reused_from']}" if report.get("reused_from")
              else f"compiled in {report.get('seconds', 0):.0f} s")
    text = (f"kernel report: {len(rows)} configs of {len(kernels)} kernels for "
            f"{', '.join(f'sm_{a}' for a in arches)} ({origin}): ")
    if bad:
        names = sorted({f"{r['module'].rsplit('.', 1)[-1]}.{r['name']}" for r in bad})
        text += f"{len(bad)} with problems ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    else:
        text += "no spills, registers, shared memory and tensor cores within the gate"
    return text + (f"; details in {csv_path}" if csv_path else "")
