"""Prints the Triton variants the GPU lane compiles and the compile wall time they predict.

``python tests/scripts/lane_variants_report.py WORKERS TEST_PATH...`` (what
``scripts/gpu_lane.sh --dry-run`` runs) reads the measurement committed in
``lane_variants.json`` (made by the ``lane_variants`` pytest plugin, which runs
the selection; too slow for the dry run) and says whether the kernel and test
sources are still those it was measured at. Its last line is the summary the
lane's verdict shows.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lane_variants import measured_sources, source_hash  # noqa: E402

MEASUREMENT = Path(__file__).resolve().parent / "lane_variants.json"
# JIT compile time of one variant on the GPU machine (issue 20's measurement: 1.3 to 3 s each, one process).
COMPILE_S = (1.3, 3.0)
GOAL_S = 120


def main(argv) -> int:
    workers, selection = int(argv[0]), list(argv[1:])
    if not MEASUREMENT.exists():
        print(f"variants: no measurement ({MEASUREMENT.name} missing)")
        return 0
    m = json.loads(MEASUREMENT.read_text())
    current = source_hash(measured_sources(selection))
    fresh = "current" if (m["source_hash"] == current and m["selection"] == selection) else (
        f"sources changed since (now {current}): re-measure with the lane_variants plugin")
    variants = m["variants"]
    low, high = (variants * s / workers for s in COMPILE_S)
    top = sorted(m["per_kernel"].items(), key=lambda kv: -kv[1])[:6]
    print("variants per kernel (largest): " + ", ".join(f"{k} {v}" for k, v in top))
    print(f"variants: {variants} distinct Triton variants (measured at {m['source_hash']}, {fresh}); "
          f"estimated compile wall time at {workers} workers {low:.0f}-{high:.0f} s "
          f"({COMPILE_S[0]}-{COMPILE_S[1]} s each; goal <= {GOAL_S} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
