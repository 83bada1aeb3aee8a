"""The training-step level's table: one row per (model, method) and dtype, fastpeft beside its peer.

Columns: the floor's step (the frozen model, backward through every layer), fastpeft's and the peer's
steps (median ms ± interquartile range in % of the median), ``peer/fastpeft`` (the per-round ratio of
the peer's step to fastpeft's, median ± IQR %: above 1, fastpeft is faster), each one's overhead over the
floor (ms, median of the per-round differences), ``overhead fastpeft/peer`` (per-round ratio of the two
overheads: below 1, fastpeft adds less), and the peak memory of one step of each.
"""
from __future__ import annotations

from .tables import flag_marks, fmt_num

TITLE = "Training step (forward, backward, AdamW) of a whole model"
LEGEND = ("`peer/fastpeft`: the peer's step time over fastpeft's, per interleaved round (above 1: fastpeft is "
          "faster). `overhead`: step time minus the floor's (the frozen model with backward through every layer) "
          "in the same round; `overhead fastpeft/peer` below 1: fastpeft adds less than the peer. `±`: "
          "interquartile range in % of the median; `~`: noisy (above 10%). `peak MB`: the most one step allocates "
          "above what was allocated before it (activations, gradients, temporaries), from torch's profiler. bfloat16: the "
          "float32 model under `torch.autocast(bfloat16)`.")
HEADER = ["model", "method", "floor ms", "fastpeft ms", "peer", "peer ms", "peer/fastpeft", "fastpeft overhead ms",
          "peer overhead ms", "overhead fastpeft/peer", "peak MB fastpeft", "peak MB peer"]


def _ms(row) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return "n/a" if row.get("status") == "not available" else "ERROR"
    return f"{fmt_num(row['median_ms'])} ±{row['iqr_pct']:.0f}%{flag_marks(row)}"


def _ratio(value, iqr_pct, *rows) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x ±{iqr_pct:.0f}%{flag_marks(*rows)}"


def _num(value) -> str:
    return "-" if value is None else fmt_num(value)


def dtypes_in(rows: list) -> list:
    return list(dict.fromkeys(r["dtype"] for r in rows if r["op"] == "train_step"))


def table(rows: list, dtype: str) -> tuple:
    """``(header, body, notes)`` of the training-step rows of ``dtype``."""
    rows = [r for r in rows if r["op"] == "train_step" and r["dtype"] == dtype]
    body, notes = [], []
    for model in dict.fromkeys(r["model"] for r in rows):
        of_model = [r for r in rows if r["model"] == model]
        floor = next((r for r in of_model if r["method"] == "floor"), None)
        if floor is not None and floor["status"] != "ok":
            body.append([model, "all", "n/a"] + ["-"] * (len(HEADER) - 3))
            notes.append(f"{model}: {floor['note']}")
            continue
        for method in dict.fromkeys(r["method"] for r in of_model if r["method"] != "floor"):
            ours = next((r for r in of_model if r["method"] == method and r["ours"]), None)
            peer = next((r for r in of_model if r["method"] == method and r["role"] == "peer"), None)
            body.append([model, method, _ms(floor), _ms(ours), peer["provider"] if peer else "-", _ms(peer),
                         _ratio(peer.get("fastpeft_speedup") if peer else None,
                                peer.get("speedup_iqr_pct", 0) if peer else 0, ours, peer),
                         _num(ours.get("overhead_ms") if ours else None),
                         _num(peer.get("overhead_ms") if peer else None),
                         _ratio(ours.get("overhead_vs_peer") if ours else None,
                                ours.get("overhead_vs_peer_iqr_pct", 0) if ours else 0, ours, peer, floor),
                         _num(ours.get("peak_mb") if ours else None), _num(peer.get("peak_mb") if peer else None)])
            for r in (ours, peer):
                if r is not None and r.get("note"):
                    notes.append(f"{model}, {method}, {r['provider']}: {r['note']}")
    return HEADER, body, notes


def title(dtype: str) -> str:
    return f"{TITLE}, {dtype}" + (" autocast" if dtype == "bfloat16" else "")
