"""Result rows as tables: one per (op, mode), for the terminal and for markdown.

Columns: each provider's median time (± interquartile range in % of the
median), then ratios of times: ``p/base`` is the overhead of provider p over
the op's baseline (the frozen base layer), ``peer/fastpeft`` is fastpeft's
speedup over a peer (above 1: fastpeft is faster). Then fastpeft's place on
the roofline: the larger of its fractions of the measured matmul and copy
ceilings, and in forward+backward mode the activation memory each provider
saves for backward.
"""
from __future__ import annotations

from .runner import ERROR, NOT_AVAILABLE, OK, WRONG
from .spec import FORWARD_BACKWARD


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


def _time_cell(row) -> str:
    if row is None:
        return "-"
    if row["status"] == OK:
        return f"{fmt_num(row['median_ms'])} ±{row['iqr_pct']:.0f}%"
    return {NOT_AVAILABLE: "n/a", ERROR: "ERROR", WRONG: "WRONG"}.get(row["status"], row["status"])


def _ratio_cell(row, key) -> str:
    if row is None or row["status"] != OK or key not in row:
        return "-"
    return f"{row[key]:.2f}x"


def _roofline_cell(row) -> str:
    if row is None or row["status"] != OK:
        return "-"
    if row["pct_peak_flops"] >= row["pct_peak_bw"]:
        return f"{row['pct_peak_flops']:.0f}% flop"
    return f"{row['pct_peak_bw']:.0f}% mem"


def _mb_cell(row) -> str:
    if row is None or row.get("saved_mb") is None:
        return "-"
    return f"{row['saved_mb']:.2f}"


def op_mode_table(op, mode: str, rows: list) -> tuple:
    """``(header, body, notes)`` for one op and mode; ``rows`` are that op's rows."""
    rows = [r for r in rows if r["op"] == op.name and r["mode"] == mode]
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
    if mode == FORWARD_BACKWARD:
        header += [f"{p} saved MB" for p in providers]
    body = []
    for shape in shapes:
        line = [shape] + [_time_cell(cell.get((shape, p))) for p in providers]
        if op.baseline in providers:
            line += [_ratio_cell(cell.get((shape, p)), "overhead") for p in others]
        if has_ours:
            line += [_ratio_cell(cell.get((shape, p)), "fastpeft_speedup") for p in peers]
            line += [_roofline_cell(cell.get((shape, op.ours)))]
        if mode == FORWARD_BACKWARD:
            line += [_mb_cell(cell.get((shape, p))) for p in providers]
        body.append(line)
    notes = []
    for r in rows:
        if r["status"] != OK:
            note = f"{r['provider']}: {r['status']}: {r['note']}"
            if note not in notes:
                notes.append(note)
    return header, body, notes


SHORT_MODES = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}


def headline_table(op, rows: list) -> tuple:
    """``(header, body)``: per shape and mode, the baseline's time and each headline provider's ratio to it."""
    rows = [r for r in rows if r["op"] == op.name]
    modes = [m for m in op.modes if any(r["mode"] == m for r in rows)]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cell = {(r["shape"], r["mode"], r["provider"]): r for r in rows}
    header, columns = ["shape"], []
    for mode in modes:
        for p in op.headline:
            if p == op.baseline:
                header.append(f"{SHORT_MODES.get(mode, mode)} {p} ms")
                columns.append((mode, p, None))
            else:
                header.append(f"{SHORT_MODES.get(mode, mode)} {p}/{op.baseline}")
                columns.append((mode, p, "overhead"))
    body = []
    for shape in shapes:
        line = [shape]
        for mode, p, key in columns:
            row = cell.get((shape, mode, p))
            line.append(_time_cell(row) if key is None else _ratio_cell(row, key))
        body.append(line)
    return header, body


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
