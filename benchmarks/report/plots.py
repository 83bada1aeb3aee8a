"""PNG plots: fastpeft's speedup over each peer at equal precision against the token count, one file per op.

One panel per mode (columns) and compute precision (rows); one line per
(peer, shape group). The y axis is peer time / fastpeft time on a log scale, so
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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

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
        if (r["op"] != op or r["mode"] != mode or r["role"] != "peer" or r.get("fastpeft_speedup") is None
                or r.get("fastpeft_speedup") == ""):
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


def _ratio_ticks(ax) -> None:
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_op(rows: list, op: str, title: str, modes: list, path: Path, subtitle: str = "") -> bool:
    """Writes ``path``; False (and no file) when there is nothing to plot."""
    by_mode = {m: speedup_series(rows, op, m) for m in modes}
    modes = [m for m in modes if by_mode[m]]
    if not modes:
        return False
    precisions = sorted({p for m in modes for p in by_mode[m]}, key=lambda p: _ORDER.get(p, len(_ORDER)))
    labels = sorted({key for m in modes for series in by_mode[m].values() for key in series})
    colors = {key: f"C{i % 10}" for i, key in enumerate(labels)}  # one colour per series in every panel
    tokens = sorted({t for m in modes for series in by_mode[m].values() for pts in series.values() for t, *_ in pts})
    fig, axes = plt.subplots(len(precisions), len(modes), figsize=(5.5 * len(modes), 4.2 * len(precisions)),
                             squeeze=False)
    for i, precision in enumerate(precisions):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            series = by_mode[mode].get(precision, {})
            for (label, group), points in series.items():
                xs, ys, lows, highs = zip(*points)
                err = [[max(y - lo, 0) for y, lo in zip(ys, lows)], [max(hi - y, 0) for y, hi in zip(ys, highs)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", markersize=6 if len(xs) > 1 else 8, capsize=3,
                            color=colors[(label, group)], label=f"vs {label}" + (f" ({group})" if group else ""))
            ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
            ax.annotate("same speed as fastpeft", xy=(0.01, 1.0), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.set_yscale("log")
            _ratio_ticks(ax)
            ax.set_xlabel("tokens (M)")
            ax.set_ylabel("peer time / fastpeft time (above 1: fastpeft faster)")
            ax.set_title(f"{mode}, {short(precision)} compute")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no peer at this precision", transform=ax.transAxes, ha="center")
    fig.suptitle(f"{title}: fastpeft speedup at equal precision" + (f" — {subtitle}" if subtitle else ""))
    fig.tight_layout()
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
