"""Timing script (not a test): the fp32 NF4 decode GEMV (M <= 8) vs dense fp32 ``F.linear``, interleaved.

Run (issue 13, item 3; the 2-thread wall-clock rows, then the 1-thread CPU-time rows for a loaded machine):
    python -m benchmarks.standalone.nf4_cpu_speed --shapes 4096x4096 4096x14336 14336x4096 --m 1 2 4 8 --threads 2
    python -m benchmarks.standalone.nf4_cpu_speed --shapes 4096x4096 --m 1 --threads 1 --clock thread-cpu

Shapes are ``NxK`` (W is [N, K], blocksize 64; ``--double-quant`` decodes the
nested absmax once, as ``NF4Weight.absmax_float`` caches it). Per row, in one
process and interleaved (dense, native, wrapper, dense, ... one call each per
round after warm-up, so load on the shared machine hits all alike):
- ``dense``: ``F.linear(x, W)`` on the fp32 dequantized W (streams 4·N·K bytes);
- ``native``: the native op ``nf4_matmul`` on the packed bytes and fp32 absmax
  (streams N·K/2 + 4·N·K/blocksize bytes);
- ``wrapper``: ``fastpeft.cpu.nf4_native.nf4_matmul`` (checks + reshape around it).
x is fp32 or bf16 (``--dtypes``); bf16 x is converted to fp32 for the decode GEMV.
Printed: medians (ms), the median of the per-round ratios NF4 / dense (< 1: NF4
faster; the issue's goal is <= 0.25 at M = 1) with its interquartile range, the
ratio of the minima (the least disturbed calls: on a machine shared by other
jobs, 2-thread medians include rounds where one thread was descheduled), and
the bytes each streams per second beside a measured copy bandwidth
(``dst.copy_(src)`` of 64 MiB, counted as read + write).

``--clock thread-cpu`` times the calling thread's CPU time (immune to time spent
descheduled); it needs ``--threads 1`` so that all the work runs on that thread.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from fastpeft import _native
from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight

BLOCKSIZE = 64


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[1], q[2]


def interleaved(fns, rounds, clock, inner, warmup=3):
    """Per round, each fn runs ``inner`` times back to back; returns per-call times (s) per fn, per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            times[name].append((clock() - t0) / inner)
    return times


def copy_bandwidth(clock, rounds):
    """GB/s of ``dst.copy_(src)`` over 64 MiB (read + write counted), median of ``rounds``."""
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    times = interleaved({"copy": lambda: dst.copy_(src)}, rounds, clock, inner=2)["copy"]
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096"], help="NxK of W")
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--inner", type=int, default=5, help="calls per provider per round")
    p.add_argument("--clock", choices=["wall", "thread-cpu"], default="wall")
    p.add_argument("--double-quant", action="store_true")
    args = p.parse_args()
    if args.clock == "thread-cpu" and args.threads != 1:
        p.error("--clock thread-cpu needs --threads 1")
    clock = time.thread_time if args.clock == "thread-cpu" else time.perf_counter
    torch._logging.set_logs(dynamo=logging.ERROR)
    torch.set_num_threads(args.threads)
    native = _native.op("nf4_matmul")
    bw = copy_bandwidth(clock, args.rounds)
    print(f"threads={args.threads} clock={args.clock} rounds={args.rounds}x{args.inner} simd={_native.op('simd_enabled')()}"
          f" double_quant={args.double_quant} copy bandwidth {bw:.1f} GB/s (read+write)")
    print(f"{'shape':>11} {'dtype':>8} {'M':>2} | {'dense ms':>8} {'native ms':>9} {'wrapper ms':>10} | "
          f"{'native/dense':>12} {'IQR':>11} {'min/min':>7} {'wrapper/dense':>13} | {'dense GB/s':>10} {'NF4 GB/s':>8}")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        torch.manual_seed(0)
        q = NF4Weight.from_float(torch.randn(n, k) * 0.02, BLOCKSIZE, double_quant=args.double_quant)
        absmax = q.absmax_float().contiguous()
        dense_bytes = 4 * n * k
        nf4_bytes = q.packed.numel() + 4 * absmax.numel()
        for dtype in args.dtypes:
            wd = q.dequantize(torch.float32)
            for m in args.m:
                x = torch.randn(m, k).to(getattr(torch, dtype))
                x32 = x.float()
                fns = {
                    "dense": lambda: F.linear(x32, wd),
                    "native": lambda: native(x, q.packed, absmax, n, k, BLOCKSIZE, None),
                    "wrapper": lambda: nf4_native.nf4_matmul(x, q),
                }
                t = interleaved(fns, args.rounds, clock, args.inner)
                ratio = [a / b for a, b in zip(t["native"], t["dense"])]
                ratio_w = [a / b for a, b in zip(t["wrapper"], t["dense"])]
                lo, med, hi = quartiles(ratio)
                td, tn, tw = (statistics.median(t[name]) for name in ("dense", "native", "wrapper"))
                print(f"{shape:>11} {dtype:>8} {m:2d} | {td * 1e3:8.3f} {tn * 1e3:9.3f} {tw * 1e3:10.3f} | "
                      f"{med:12.3f} [{lo:.2f},{hi:.2f}] {min(t['native']) / min(t['dense']):7.3f} {statistics.median(ratio_w):13.3f} | "
                      f"{dense_bytes / td / 1e9:10.1f} {nf4_bytes / tn / 1e9:8.1f}", flush=True)
            del wd


if __name__ == "__main__":
    main()
