"""PNG plots: fastpeft's speedup over each peer against the token count, one file per op.

One panel per mode; one line per (peer, shape group). Above the dashed line
at 1, fastpeft is faster. Can also be run on a saved results.json:
``python -m benchmarks.plots benchmarks/results/<tag>/results.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def speedup_series(rows: list, op: str, mode: str) -> dict:
    """``{(peer, group): [(tokens, speedup), ...]}`` for one op and mode, sorted by tokens."""
    series = {}
    for r in rows:
        if r["op"] != op or r["mode"] != mode or r["role"] != "peer" or r.get("fastpeft_speedup") is None:
            continue
        series.setdefault((r["provider"], r["group"]), []).append((r["tokens"], r["fastpeft_speedup"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_op(rows: list, op: str, title: str, modes: list, path: Path, subtitle: str = "") -> bool:
    """Writes ``path``; False (and no file) when there is nothing to plot."""
    panels = [(m, speedup_series(rows, op, m)) for m in modes]
    panels = [(m, s) for m, s in panels if s]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (mode, series) in zip(axes[0], panels):
        for (peer, group), points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=f"vs {peer}" + (f" ({group})" if group else ""))
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("fastpeft speedup (peer time / fastpeft time)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}" + (f" — {subtitle}" if subtitle else ""))
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
        print("usage: python -m benchmarks.plots RESULTS_JSON", file=sys.stderr)
        return 2
    path = Path(argv[0])
    data = json.loads(path.read_text())
    for p in plot_all(data["results"], ops_in(data["results"]), path.parent, data["metadata"].get("device_name", "")):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
