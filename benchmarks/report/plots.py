"""PNG plots: fastpeft's speedup over each peer at equal precision against the token count, one file per op.

One panel per mode (columns) and compute precision (rows); one line per
(peer, shape group); an op with more than ``MAX_GROUPS_PER_PANEL`` shape groups
gets one panel row per (precision, group), one line per peer. Legends sit right
of the panels; the ratio axis has a few labelled ticks however narrow its range. The y axis is peer time / fastpeft time on a log scale, so
2x faster and 2x slower are the same distance from the labelled 1.0 line
("same speed as fastpeft"): above it fastpeft is faster. Error bars span the
ratio of the interquartile ranges (peer q25 / fastpeft q75 to peer q75 /
fastpeft q25); every point has a marker, so a single-token series shows too.
A peer that computes at another precision than its inputs is plotted in that
precision's panel, against fastpeft at the same precision
(``runner.add_speedups``), and its label names its input dtype. Can also be run
on a saved results.json: ``python -m benchmarks.report.plots benchmarks/results/<tag>/results.json``.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from ..suite.precision import BANDS, short  # noqa: E402

_ORDER = {name: i for i, (_, name) in enumerate(BANDS)} | {"float16": 2}


def _precision(row: dict) -> str:
    return row.get("compute_dtype") or row["dtype"]


def speedup_series(rows: list, op: str, mode: str) -> dict:
    """``{precision: {(label, group): [(tokens, speedup, low, high), ...]}}`` for one op and mode, by tokens.

    ``low``/``high`` are the IQR bounds of the ratio.
    """
    ours = {(r["shape"], r["dtype"]): r for r in rows
            if r["op"] == op and r["mode"] == mode and r["role"] == "fastpeft" and r["status"] == "ok"}
    panels = {}
    for r in rows:
        if (r["op"] != op or r["mode"] != mode or r["role"] not in ("peer", "baseline")
                or r.get("fastpeft_speedup") is None or r.get("fastpeft_speedup") == ""):
            continue
        speedup = float(r["fastpeft_speedup"])
        fast = ours.get((r["shape"], r.get("speedup_vs", r["dtype"])))
        low = high = speedup
        if fast is not None:
            low, high = r["q25_ms"] / fast["q75_ms"], r["q75_ms"] / fast["q25_ms"]
        label = r["provider"]
        if r.get("compute_dtype") and r.get("speedup_vs") and r["speedup_vs"] != r["dtype"]:
            label += f", {short(r['dtype'])} inputs"
        panels.setdefault(_precision(r), {}).setdefault((label, r["group"]), []).append(
            (r["tokens"], speedup, low, high))
    return {p: {k: sorted(v) for k, v in s.items()} for p, s in panels.items()}


# Candidate ratio ticks: fine steps near 1 for narrow ranges, then 1-2-5 decades.
_NICE_RATIOS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0,
                2.5, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
_DECADE_RATIOS = tuple(m * 10.0 ** e for e in range(-3, 4) for m in (1, 2, 5))
MAX_TICKS = 7
MAX_GROUPS_PER_PANEL = 3  # more shape groups than this: one panel per group (prefix attention's 6)
TITLE_CHARS_PER_INCH = 11


def _ratio_ticks(ax, values) -> None:
    """Log-scale ratio axis with 1.0 and a few labelled ticks inside the data's range, however narrow."""
    lo, hi = min(min(values), 1.0), max(max(values), 1.0)
    lo, hi = lo / 1.08, hi * 1.08
    ax.set_ylim(lo, hi)
    if hi / lo > 20:  # wide: 1-2-5 per decade, or decades alone when those are too many
        ticks = [v for v in _DECADE_RATIOS if lo <= v <= hi]
        if len(ticks) > MAX_TICKS + 1:
            ticks = [v for v in ticks if f"{v:g}".lstrip("0.").startswith("1")]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_locator(NullLocator())
        return
    step = (hi / lo) ** (1.0 / MAX_TICKS)  # neighbouring labels at least this factor apart
    ticks = [1.0]
    for v in _NICE_RATIOS:  # upwards from 1
        if v > ticks[-1] * step * 0.999 and v <= hi:
            ticks.append(v)
    for v in reversed(_NICE_RATIOS):  # downwards from 1
        if v < ticks[0] / step * 1.001 and v >= lo:
            ticks.insert(0, v)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_locator(NullLocator())


def _panels(by_mode: dict, modes: list) -> list:
    """``[(precision, group or None)]`` panel rows: one per precision, or one per (precision, shape group)
    when an op has more shape groups than fit on one panel's legend."""
    precisions = sorted({p for m in modes for p in by_mode[m]}, key=lambda p: _ORDER.get(p, len(_ORDER)))
    groups = list(dict.fromkeys(g for m in modes for s in by_mode[m].values() for _, g in s))
    if len(groups) <= MAX_GROUPS_PER_PANEL:
        return [(p, None) for p in precisions]
    return [(p, g) for p in precisions for g in groups
            if any(key[1] == g for m in modes for key in by_mode[m].get(p, {}))]


def plot_op(rows: list, op: str, title: str, modes: list, path: Path, subtitle: str = "") -> bool:
    """Writes ``path``; False (and no file) when there is nothing to plot."""
    by_mode = {m: speedup_series(rows, op, m) for m in modes}
    modes = [m for m in modes if by_mode[m]]
    if not modes:
        return False
    panels = _panels(by_mode, modes)
    labels = sorted({key for m in modes for series in by_mode[m].values() for key in series})
    per_group = any(group is not None for _, group in panels)
    # one colour per series in every panel (per peer when each panel holds one shape group)
    names = sorted({label for label, _ in labels}) if per_group else labels
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    tokens = sorted({t for m in modes for series in by_mode[m].values() for pts in series.values() for t, *_ in pts})
    width = 5.0 * len(modes) + 2.6  # room for the legends right of the panels
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(width, 3.6 * len(panels)), squeeze=False)
    for i, (precision, only_group) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            series = {k: v for k, v in by_mode[mode].get(precision, {}).items()
                      if only_group is None or k[1] == only_group}
            values = [1.0]
            for (label, group), points in sorted(series.items()):
                xs, ys, lows, highs = zip(*points)
                values += list(lows) + list(highs) + list(ys)
                err = [[max(y - lo, 0) for y, lo in zip(ys, lows)], [max(hi - y, 0) for y, hi in zip(ys, highs)]]
                name = f"vs {label}" + (f" ({group})" if group and not per_group else "")
                ax.errorbar(xs, ys, yerr=err, marker="o", markersize=6 if len(xs) > 1 else 8, capsize=3,
                            color=colors[label if per_group else (label, group)], label=name)
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
            ax.annotate("same speed as fastpeft", xy=(0.01, 1.0), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.set_yscale("log")
            _ratio_ticks(ax, [v for v in values if v > 0])
            ax.set_xlabel("tokens (M)")
            ax.set_ylabel("peer time / fastpeft time\n(above 1: fastpeft faster)", fontsize=9)
            ax.set_title(f"{mode}, {short(precision)} compute" + (f"\n{only_group}" if only_group else ""),
                         fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if series:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
            else:
                ax.text(0.5, 0.5, "no peer at this precision", transform=ax.transAxes, ha="center")
    heading = f"{title}: fastpeft speedup at equal precision" + (f" — {subtitle}" if subtitle else "")
    heading = textwrap.fill(heading, int(width * TITLE_CHARS_PER_INCH))
    fig.suptitle(heading, fontsize=11)
    title_inches = 0.2 * (heading.count("\n") + 1) + 0.05
    fig.tight_layout(rect=(0, 0, 1, 1 - title_inches / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_all(rows: list, ops: list, out_dir: Path, subtitle: str = "") -> list:
    """One PNG per op that has fastpeft results; returns the paths written."""
    paths = []
    for op in ops:
        path = Path(out_dir) / f"speedup_{op['name']}.png"
        if plot_op(rows, op["name"], op["title"], op["modes"], path, subtitle):
            paths.append(path)
    return paths


def ops_in(rows: list) -> list:
    ops = {}
    for r in rows:
        ops.setdefault(r["op"], {"name": r["op"], "title": r["op"], "modes": []})
        if r["mode"] not in ops[r["op"]]["modes"]:
            ops[r["op"]]["modes"].append(r["mode"])
    return list(ops.values())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report.plots RESULTS_JSON", file=sys.stderr)
        return 2
    path = Path(argv[0])
    data = json.loads(path.read_text())
    ops = data["metadata"].get("ops") or ops_in(data["results"])
    for p in plot_all(data["results"], ops, path.parent, data["metadata"].get("device_name", "")):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
