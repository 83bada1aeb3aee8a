"""Timing script (not a test): fastpeft's CPU NF4 / QLoRA layers vs bitsandbytes and PEFT, bf16 and fp32.

Run (2 threads, the issue-13 rows; on a loaded machine add --threads 1 --clock thread-cpu):
    python -m benchmarks.standalone.nf4_cpu_bf16_speed --m 1 64 256 --rounds 40
    python -m benchmarks.standalone.nf4_cpu_bf16_speed --sweep 1 2 4 8 9 12 16 --rounds 40   # the bf16 row thresholds

Rows: an NF4 base (blocksize 64, double quant: QLoRA's default) of ``--n x --k``, and
QLoRA = that base + LoRA rank ``--r`` (scaling 2). Providers, one layer each:
- ``nf4``: fastpeft ``nf4_linear`` vs bitsandbytes ``Linear4bit`` (the same codes);
- ``qlora``: fastpeft ``qlora_linear`` vs PEFT's LoRA ``Linear4bit`` around that bitsandbytes layer.
Modes: ``fwd`` (no autograd) and ``fwd+bwd`` (x, A and B need gradients; ``y.backward(dy)``).

The machine is shared, so the providers of a row are timed interleaved in one
process (A, B, A, B, ... one call each after warm-up) and the script prints,
per row, the median time of each, the median of the per-round ratios
fastpeft / peer (< 1: fastpeft faster) with its interquartile range, and the
ratio of the minima. Errors are ‖out − ref‖/‖ref‖ against the float64 math on
the same NF4 codes (output and every gradient, worst of them), beside plain
torch's error in the same dtype (F.linear on the dequantized weight).

``--sweep`` times the native kernels alone on bf16 rows (fp32 fused GEMV/GEMM,
bf16 dequantize + torch GEMM, fused AMX), the measurement behind the
``BF16_*_MIN_ROWS`` thresholds of ``fastpeft.cpu.nf4_native``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from fastpeft.ops.nf4 import nf4_linear
from fastpeft.ops.qlora import qlora_linear
from fastpeft.cpu import nf4_native
from fastpeft.quant.nf4 import NF4Weight

SCALING = 2.0
BLOCKSIZE = 64


def _bnb_layer(weight, dtype, double_quant):
    import bitsandbytes as bnb

    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=double_quant,
                              quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit(weight.detach().float(), requires_grad=False, quant_type="nf4",
                                     blocksize=BLOCKSIZE, compress_statistics=double_quant)
    return layer.to("cpu")


def _peft_layer(bnb_layer, lora_A, lora_B):
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    r = lora_A.shape[0]
    alpha = SCALING * r
    layer = PeftLinear4bit(bnb_layer, "default", config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0),
                           r=r, lora_alpha=alpha, lora_dropout=0.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.data = lora_A.detach().clone()
        b.data = lora_B.detach().clone()
    return layer, a, b


class Row:
    """One (op, dtype, M): the fastpeft callable, the peer callable, and what their outputs/grads are."""

    def __init__(self, op, dtype, m, args, weight, q):
        k, n, r = args.k, args.n, args.r
        gen = torch.Generator().manual_seed(m)
        self.x = torch.randn(m, k, generator=gen).to(dtype)
        self.dy = torch.randn(m, n, generator=gen).to(dtype)
        self.op = op
        self.q = q
        a0 = (torch.randn(r, k, generator=gen) / k**0.5).to(dtype)
        b0 = (torch.randn(n, r, generator=gen) / r**0.5).to(dtype)
        self.lora = (a0, b0)
        bnb_layer = _bnb_layer(weight, dtype, args.double_quant)
        if op == "nf4":
            self.ours_params = []
            self.ours = lambda x: nf4_linear(x, q)
            self.peer, self.peer_params = bnb_layer, []
        else:
            a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
            self.ours_params = [a, b]
            self.ours = lambda x: qlora_linear(x, q, a, b, SCALING)
            self.peer, pa, pb = _peft_layer(bnb_layer, a0, b0)
            self.peer.train()
            self.peer_params = [pa, pb]

    def call(self, which, backward):
        fn, params = (self.ours, self.ours_params) if which == "ours" else (self.peer, self.peer_params)
        if not backward:
            with torch.no_grad():
                return fn(self.x), []
        x = self.x.detach().requires_grad_(True)
        for p in params:
            p.grad = None
        y = fn(x)
        y.backward(self.dy)
        return y, [x.grad, *(p.grad for p in params)]

    def reference(self, dtype, backward):
        """(outputs in float64, outputs of plain torch in ``dtype``): same order as ``call``."""
        outs = []
        for t in (torch.float64, dtype):
            w = self.q.dequantize(t)
            x = self.x.to(t).requires_grad_(backward)
            a, b = (p.to(t).requires_grad_(backward) for p in self.lora)
            y = F.linear(x, w)
            if self.op == "qlora":
                y = y + SCALING * F.linear(F.linear(x, a), b)
            if not backward:
                outs.append((y.detach(), []))
                continue
            y.backward(self.dy.to(t))
            outs.append((y.detach(), [x.grad] + ([a.grad, b.grad] if self.op == "qlora" else [])))
        return outs


def _err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def _worst_err(result, ref):
    (y, grads), (y_ref, grads_ref) = result, ref
    return max(_err(o, r) for o, r in zip([y, *grads], [y_ref, *grads_ref]))


def _quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


CLOCK = time.perf_counter


def interleaved(fns, rounds, warmup=3):
    """Times each callable once per round, in turn (with ``CLOCK``); returns a list of times (s) per callable."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = CLOCK()
            fn()
            times[i].append(CLOCK() - t0)
    return times


def run_rows(args, weight, q):
    print(f"rows: N={args.n} K={args.k} r={args.r} blocksize={BLOCKSIZE} double_quant={args.double_quant} "
          f"threads={torch.get_num_threads()} rounds={args.rounds} clock={args.clock}")
    print(f"{'op':6} {'dtype':9} {'M':>4} {'mode':8} {'fastpeft ms':>11} {'peer ms':>9} {'ratio med [q1,q3]':>22} "
          f"{'ratio min':>9}  {'err fastpeft':>12} {'err peer':>9} {'err torch':>9}")
    for dtype in args.dtypes:
        for op in args.ops:
            for m in args.m:
                row = Row(op, dtype, m, args, weight, q)
                for backward in (False, True):
                    ref, torch_out = row.reference(dtype, backward)
                    errs = [_worst_err(row.call(w, backward), ref) for w in ("ours", "peer")]
                    errs.append(_worst_err(torch_out, ref))
                    t_ours, t_peer = interleaved([lambda: row.call("ours", backward),
                                                  lambda: row.call("peer", backward)], args.rounds)
                    q1, med, q3 = _quartiles([a / b for a, b in zip(t_ours, t_peer)])
                    print(f"{op:6} {str(dtype)[6:]:9} {m:4d} {'fwd+bwd' if backward else 'fwd':8} "
                          f"{statistics.median(t_ours) * 1e3:11.3f} {statistics.median(t_peer) * 1e3:9.3f} "
                          f"{med:8.2f} [{q1:5.2f},{q3:5.2f}]   {min(t_ours) / min(t_peer):9.2f}  "
                          f"{errs[0]:12.2e} {errs[1]:9.2e} {errs[2]:9.2e}", flush=True)


def run_sweep(args, q):
    """The native kernels alone on bf16 rows: fp32 fused kernels vs the bf16 ones (behind the row thresholds)."""
    n, k = q.shape
    absmax = q.absmax_float()
    native = torch.ops.fastpeft_native
    print(f"sweep: native kernels, bf16 inputs, N={n} K={k}; ms (median) and ratio to the fp32 kernel")
    for m in args.sweep:
        x = torch.randn(m, k).bfloat16()
        dy = torch.randn(m, n).bfloat16()
        fwd = {"fp32 fused": lambda: native.nf4_matmul(x, q.packed, absmax, n, k, BLOCKSIZE, None),
               "dequant+mm": lambda: native.nf4_matmul_bf16(x, q.packed, absmax, n, k, BLOCKSIZE, None)}
        if nf4_native.amx_available():
            fwd["amx"] = lambda: native.nf4_matmul_bf16_amx(x, q.packed, absmax, n, k, BLOCKSIZE, None)
        bwd = {"fp32 fused": lambda: native.nf4_matmul_transposed(dy, q.packed, absmax, n, k, BLOCKSIZE),
               "dequant+mm": lambda: native.nf4_matmul_transposed_bf16(dy, q.packed, absmax, n, k, BLOCKSIZE)}
        if nf4_native.amx_available():
            bwd["amx"] = lambda: native.nf4_matmul_transposed_bf16_amx(dy, q.packed, absmax, n, k, BLOCKSIZE)
        for what, fns in (("forward", fwd), ("input grad", bwd)):
            t = interleaved(list(fns.values()), args.rounds)
            parts = [f"{name} {statistics.median(ti) * 1e3:7.3f} ms (x{statistics.median([a / b for a, b in zip(ti, t[0])]):4.2f})"
                     for name, ti in zip(fns, t)]
            print(f"M={m:4d} {what:10}: " + " | ".join(parts), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--m", type=int, nargs="*", default=[1, 64, 256])
    p.add_argument("--ops", nargs="+", default=["nf4", "qlora"], choices=["nf4", "qlora"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    p.add_argument("--sweep", type=int, nargs="*", default=[])
    p.add_argument("--clock", choices=["wall", "thread-cpu"], default="wall",
                   help="thread-cpu: CPU time of the calling thread, immune to time spent descheduled on a "
                        "loaded machine; needs --threads 1 (all work then runs on the calling thread)")
    args = p.parse_args()
    if args.clock == "thread-cpu":
        if args.threads != 1:
            p.error("--clock thread-cpu needs --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    args.dtypes = [getattr(torch, d) for d in args.dtypes]
    torch.set_num_threads(args.threads)
    torch._logging.set_logs(dynamo=logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    weight = torch.randn(args.n, args.k) / args.k**0.5
    q = NF4Weight.from_float(weight, BLOCKSIZE, double_quant=args.double_quant)
    if args.sweep:
        run_sweep(args, q)
    if args.m:
        run_rows(args, weight, q)


if __name__ == "__main__":
    main()
