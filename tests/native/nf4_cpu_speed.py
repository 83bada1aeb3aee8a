"""Timing script (not a test): fused CPU NF4 matmul vs fp32 F.linear and bitsandbytes' CPU path.

Run: python tests/native/nf4_cpu_speed.py [--n 4096] [--k 4096] [--m 1 8 256] [--reps 3]
Prints median times (torch.utils.benchmark) and ratios; other processes on
the machine change the figures, so it repeats each measurement ``--reps`` times.
"""
import argparse
import logging

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from fastpeft import _native
from fastpeft.quant import nf4_cpu
from fastpeft.quant.nf4 import NF4Weight


def median_ms(fn, min_run_time=1.0):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 256])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--double-quant", action="store_true")
    p.add_argument("--no-bnb", action="store_true")
    args = p.parse_args()
    torch._logging.set_logs(dynamo=logging.ERROR)
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k) * 0.02
    q = NF4Weight.from_float(w, 64, double_quant=args.double_quant)
    wd = q.dequantize(torch.float32)
    q.absmax_float()
    bnb_lin = None
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb

            bnb_lin = bnb.nn.Linear4bit(args.k, args.n, bias=False, compute_dtype=torch.float32,
                                        compress_statistics=args.double_quant, quant_type="nf4")
            bnb_lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                               compress_statistics=args.double_quant)
            bnb_lin = bnb_lin.to("cpu").eval()
        except Exception as exc:  # bitsandbytes missing or broken: report without it
            print("bitsandbytes unavailable:", exc)
    print(f"threads={torch.get_num_threads()} N={args.n} K={args.k} simd={_native.op('simd_enabled')()}")
    for m in args.m:
        x = torch.randn(m, args.k)
        dy = torch.randn(m, args.n)
        for rep in range(args.reps):
            t_lin = median_ms(lambda: F.linear(x, wd))
            t_nf4 = median_ms(lambda: nf4_cpu.nf4_matmul(x, q))
            t_lin_t = median_ms(lambda: dy @ wd)
            t_nf4_t = median_ms(lambda: nf4_cpu.nf4_matmul_transposed(dy, q))
            line = (f"M={m:4d} rep{rep}: F.linear {t_lin:8.3f} ms | nf4_matmul {t_nf4:8.3f} ms "
                    f"(x{t_lin / t_nf4:5.2f} vs F.linear) | dy@W {t_lin_t:8.3f} ms | "
                    f"nf4_matmul_transposed {t_nf4_t:8.3f} ms (x{t_lin_t / t_nf4_t:5.2f})")
            if bnb_lin is not None:
                with torch.no_grad():
                    t_bnb = median_ms(lambda: bnb_lin(x), min_run_time=0.5)
                line += f" | bnb Linear4bit {t_bnb:8.3f} ms (x{t_bnb / t_nf4:5.1f} slower)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
