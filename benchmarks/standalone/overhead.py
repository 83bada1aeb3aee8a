"""The fixed per-call cost of fastpeft's LoRA and QLoRA layers at few tokens, against PEFT and the bare base.

``python -m benchmarks.standalone.overhead`` times one layer call (eval-mode forward, or
train-mode forward+backward) of:

- ``base``: the bare frozen base: ``F.linear`` on the dense weight (LoRA), the
  native NF4 kernels called directly (QLoRA); in forward+backward the base's input
  gradient too (``dy · W``): what any LoRA layer must pay at least;
- ``fastpeft``: ``fastpeft.nn.LoRALinear`` / ``QLoRALinear`` on the same weights;
- ``peft``: HF PEFT's ``lora.Linear`` over an ``nn.Linear`` (LoRA), PEFT's
  ``Linear4bit`` over a bitsandbytes ``Linear4bit`` (QLoRA).

Timings are interleaved: each round runs ``--calls`` calls of every provider,
in a rotating order, so machine load hits all of them alike; the table gives
medians over rounds (± the interquartile range in % of the median), and
*paired* medians (per round) of ``peft/fastpeft`` (PEFT's time over fastpeft's:
above 1, fastpeft is faster; the suite's direction) and of the overhead above
``base`` (signed µs). On a shared machine the per-call instruction
count is the steadier figure: ``--callgrind`` runs each provider under
valgrind's callgrind (one thread, instrumentation only around the timed
calls, the cyclic garbage collector paused there) and prints instructions
per call and above ``base``.

``--profile PROVIDER`` prints a cProfile of that provider's calls instead.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the suite's names
MODES = ("forward", "forward+backward")
PROVIDERS = ("base", "fastpeft", "peft")
SCALING = 2.0
BLOCKSIZE = 64


# --------------------------------------------------------------------------- layers
def _weights(k: int, n: int, r: int, dtype):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    lora_B = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    return weight, lora_A, lora_B


def _load_pair(a: torch.nn.Parameter, b: torch.nn.Parameter, lora_A, lora_B) -> None:
    with torch.no_grad():
        a.copy_(lora_A)
        b.copy_(lora_B)


def _lora_layer(provider: str, weight, lora_A, lora_B, train: bool) -> Callable:
    n, k = weight.shape
    r = lora_A.shape[0]
    if provider == "base":
        return lambda x: F.linear(x, weight)
    if provider == "fastpeft":
        from fastpeft.nn.lora import LoRALinear

        base = torch.nn.Linear(k, n, bias=False, dtype=weight.dtype)
        base.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer = LoRALinear(base, r=r, lora_alpha=SCALING * r, init_lora_weights=False)
        _load_pair(layer.lora_A.weight, layer.lora_B.weight, lora_A, lora_B)
        return layer.train(train)
    from ..ops.lora import peft_lora_layer

    layer, _ = peft_lora_layer(weight, lora_A.clone().requires_grad_(train), lora_B.clone().requires_grad_(train),
                               SCALING, "forward_backward" if train else "forward")
    return layer


class _NativeNF4Base(torch.autograd.Function):
    """The bare NF4 base: the native kernels, one Python hop each way, nothing else."""

    @staticmethod
    def forward(ctx, x, packed, absmax, n, k):
        from fastpeft.cpu.nf4 import _native_cpu

        ctx.state = (packed, absmax, n, k)
        return _native_cpu().nf4_matmul_packed(x, packed, absmax, n, k, BLOCKSIZE, None)

    @staticmethod
    def backward(ctx, dy):
        from fastpeft.cpu.nf4 import _native_cpu

        packed, absmax, n, k = ctx.state
        return (_native_cpu().nf4_matmul_transposed_packed(dy, packed, absmax, n, k, BLOCKSIZE),
                None, None, None, None)


def _qlora_layer(provider: str, weight, lora_A, lora_B, train: bool) -> Callable:
    from fastpeft.nn.nf4 import NF4Linear
    from fastpeft.quant.nf4 import NF4Weight

    n, k = weight.shape
    r = lora_A.shape[0]
    if provider == "base":
        w = NF4Weight.from_float(weight, blocksize=BLOCKSIZE, double_quant=False)
        packed, absmax = w.packed, w.absmax_float()
        return lambda x: _NativeNF4Base.apply(x, packed, absmax, n, k)
    if provider == "fastpeft":
        from fastpeft.nn.qlora import QLoRALinear

        base = NF4Linear(NF4Weight.from_float(weight, blocksize=BLOCKSIZE, double_quant=False))
        layer = QLoRALinear(base, r=r, lora_alpha=SCALING * r, init_lora_weights=False)
        _load_pair(layer.lora_A.weight, layer.lora_B.weight, lora_A, lora_B)
        return layer.train(train)
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from ..ops.nf4 import bnb_linear4bit

    alpha = SCALING * r
    layer = PeftLinear4bit(bnb_linear4bit(weight, weight.dtype, "cpu"), "default",
                           config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0),
                           r=r, lora_alpha=alpha, lora_dropout=0.0)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.data, b.data = lora_A.clone(), lora_B.clone()
    a.requires_grad_(train)
    b.requires_grad_(train)
    return layer.train(train)


def build_step(op: str, provider: str, dtype, mode: str, tokens: int, k: int, n: int, r: int) -> Callable[[], None]:
    """One call of ``provider``'s layer: ``y = layer(x)`` (eval) or ``layer(x).backward(dy)`` (train)."""
    train = mode == "forward+backward"
    weight, lora_A, lora_B = _weights(k, n, r, dtype)
    make = _lora_layer if op == "lora" else _qlora_layer
    layer = make(provider, weight, lora_A, lora_B, train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=g).to(dtype).requires_grad_(train)
    dy = torch.randn(tokens, n, generator=g).to(dtype)
    if not train:
        def step():
            with torch.no_grad():
                layer(x)
    else:
        def step():
            layer(x).backward(dy)
    return step


# --------------------------------------------------------------------------- timing
def time_interleaved(steps: dict, rounds: int, calls: int) -> dict:
    """Per provider, the per-call seconds of each round; providers alternate within every round."""
    names = list(steps)
    for step in steps.values():  # warm-up: first-call costs (allocations, lazy imports, JIT) stay out
        for _ in range(3):
            step()
    samples = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(calls):
                step()
            samples[name].append((time.perf_counter() - start) / calls)
    return samples


def _paired(samples: dict, f) -> float:
    return statistics.median(f(*per_round) for per_round in zip(*samples.values()))


def _spread(values: list) -> tuple:
    """Median and interquartile range in % of the median."""
    s = sorted(values)
    med = statistics.median(s)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 4 else (s[0], med, s[-1])
    return med, 100 * (q[2] - q[0]) / abs(med) if med else float("nan")


def report_timings(op, dtype_name, mode, tokens, samples: dict) -> list[str]:
    """One line per provider: median µs ± IQR %, then PEFT's time over fastpeft's (per round, on the peer's
    line) and the signed overhead above ``base`` (per round)."""
    names = list(samples)
    rounds = list(zip(*samples.values()))
    idx = {name: i for i, name in enumerate(names)}
    lines = []
    for name in names:
        med, iqr = _spread(samples[name])
        cells = [f"{op:5s} {dtype_name:8s} {mode:16s} M={tokens:<4d} {name:8s} {med * 1e6:9.1f} us ±{iqr:3.0f}%"]
        if name not in ("fastpeft", "base") and "fastpeft" in idx:
            ratio, ratio_iqr = _spread([t[idx[name]] / t[idx["fastpeft"]] for t in rounds])
            cells.append(f"{name}/fastpeft {ratio:5.2f}x ±{ratio_iqr:3.0f}%")
        if name != "base" and "base" in idx:
            above = statistics.median(t[idx[name]] - t[idx["base"]] for t in rounds)
            cells.append(f"{above * 1e6:+8.1f} us above base")
        lines.append("  ".join(cells))
    return lines


# --------------------------------------------------------------------------- instruction counts
_TOGGLE_C = r"""
#include <valgrind/callgrind.h>
void fp_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void fp_stop(const char *label) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT(label); }
"""


def _toggle_library(folder: str) -> str:
    """A tiny C library with callgrind's start/stop client requests, built in ``folder``."""
    src, lib = os.path.join(folder, "toggle.c"), os.path.join(folder, "toggle.so")
    with open(src, "w") as f:
        f.write(_TOGGLE_C)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", src, "-o", lib], check=True)
    return lib


def _stub_native_nf4_kernels() -> None:
    """Valgrind cannot run (or even load) the native NF4 extension: it is built with -march=native (AVX-512).

    Under ``--callgrind`` both ``base`` and ``fastpeft`` QLoRA get a dense
    matmul on the dequantized weight in place of the native kernels, so
    ``fastpeft - base`` is still fastpeft's own cost around them
    (PEFT+bitsandbytes runs its own code).
    """
    import types

    from fastpeft.cpu import nf4 as cpu_path
    from fastpeft.quant.nf4 import dequantize_nf4_reference

    dense = {}

    def weight(packed, absmax, n, k, blocksize, dtype):
        key = (packed.data_ptr(), dtype)
        if key not in dense:
            dense[key] = dequantize_nf4_reference(packed, absmax, (n, k), blocksize, dtype)
        return dense[key]

    def forward(x2d, packed, absmax, n, k, blocksize, bias=None):
        return F.linear(x2d, weight(packed, absmax, n, k, blocksize, x2d.dtype), bias)

    def input_grad(dy2d, packed, absmax, n, k, blocksize):
        return torch.mm(dy2d, weight(packed, absmax, n, k, blocksize, dy2d.dtype))

    stub = types.SimpleNamespace(ACTIVATION_DTYPES=(torch.float32, torch.float16, torch.bfloat16),
                                 nf4_matmul_packed=forward, nf4_matmul_transposed_packed=input_grad)
    cpu_path._native_cpu = lambda: stub


def count_in_this_process(args) -> None:
    """Runs under callgrind: for each measurement build, warm up, then instrument exactly ``--calls`` calls."""
    torch.set_num_threads(1)
    if "qlora" in args.op:
        _stub_native_nf4_kernels()
    toggle = ctypes.CDLL(args.toggle_lib)
    toggle.fp_stop.argtypes = [ctypes.c_char_p]
    for op, dtype_name, mode, tokens in _configs(args):
        for provider in args.providers:
            step = build_step(op, provider, DTYPES[dtype_name], mode, tokens, args.k, args.n, args.r)
            for _ in range(3):
                step()
            gc.collect()
            gc.disable()  # a collection inside the window would land on whichever provider triggered it
            toggle.fp_start()
            for _ in range(args.calls):
                step()
            toggle.fp_stop(f"{op}|{dtype_name}|{mode}|{tokens}|{provider}".encode())
            gc.enable()


_LABEL_LINE = "desc: Trigger: Client Request: "


def count_instructions(args) -> dict:
    """``{(op, dtype, mode, tokens, provider): instructions per call}`` from callgrind runs of this module.

    PEFT's QLoRA (bitsandbytes) runs in a valgrind process of its own: if its
    native code is beyond valgrind, only its own counts are lost.
    """
    folder = tempfile.mkdtemp(prefix="fastpeft-overhead-")
    lib = _toggle_library(folder)
    groups = [(args.op, [p for p in args.providers if p != "peft"])]
    if "peft" in args.providers:
        groups += [([op], ["peft"]) for op in args.op]
    for i, (ops, providers) in enumerate(groups):
        if not providers:
            continue
        out = os.path.join(folder, f"callgrind.{i}.out")
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, "-m", "benchmarks.standalone.overhead", "--_count", "--toggle-lib", lib,
               "--op", *ops, "--dtype", *args.dtype, "--mode", *args.mode, "--providers", *providers,
               "--tokens", *map(str, args.tokens), "--k", str(args.k), "--n", str(args.n), "--r", str(args.r),
               "--calls", str(args.calls)]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            print(f"callgrind run of {ops} {providers} ended with status {done.returncode}; "
                  "the counts it finished are kept\n" + done.stderr[-1500:], file=sys.stderr)
    return read_counts(folder, args.calls)


def read_counts(folder: str, calls: int) -> dict:
    """The labelled callgrind dumps in ``folder`` as ``{(op, dtype, mode, tokens, provider): instructions per call}``."""
    counts = {}
    for name in sorted(os.listdir(folder)):
        if not name.startswith("callgrind.") or name.endswith((".c", ".so")):
            continue
        label = total = None
        with open(os.path.join(folder, name)) as f:
            for line in f:
                if line.startswith(_LABEL_LINE):
                    label = line[len(_LABEL_LINE):].strip()
                elif line.startswith("totals: "):
                    total = int(line.split()[1])
        if label and total is not None:
            op, dtype_name, mode, tokens, provider = label.split("|")
            counts[(op, dtype_name, mode, int(tokens), provider)] = total / calls
    return counts


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.standalone.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", nargs="+", choices=("lora", "qlora"), default=["lora", "qlora"],
                   help="layers to measure (default: both)")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES),
                   help="input and weight dtypes (default: float32 bfloat16)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES),
                   help="forward: eval-mode call without grad; forward+backward: train-mode call and backward "
                        "(default: both)")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 64], help="token counts M (default: 1 64)")
    p.add_argument("--k", type=int, default=2048, help="in_features (default 2048)")
    p.add_argument("--n", type=int, default=2048, help="out_features (default 2048)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--calls", type=int, default=None,
                   help="calls per provider per round (default: about 20 ms of work); with --callgrind, "
                        "instrumented calls (default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="base (the bare frozen base), fastpeft, peft (default: all three)")
    p.add_argument("--profile", choices=PROVIDERS, help="print a cProfile of this provider's calls instead")
    p.add_argument("--callgrind", action="store_true", help="instructions per call under callgrind (one thread)")
    p.add_argument("--_count", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--toggle-lib", help=argparse.SUPPRESS)
    return p


def _configs(args):
    for op in args.op:
        for dtype_name in args.dtype:
            for mode in args.mode:
                for tokens in args.tokens:
                    yield op, dtype_name, mode, tokens


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args._count:
        count_in_this_process(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.callgrind:
        args.calls = args.calls or 20
        counts = count_instructions(args)
        print(f"instructions per call (callgrind, 1 thread, K={args.k} N={args.n} r={args.r}, {args.calls} calls)")
        for op, dtype_name, mode, tokens in _configs(args):
            per = {p: counts.get((op, dtype_name, mode, tokens, p)) for p in args.providers}
            cells = [f"{p} {c / 1e3:8.1f}k" for p, c in per.items() if c is not None]
            if per.get("base") is not None:
                cells += [f"{p}-base {(c - per['base']) / 1e3:8.1f}k" for p, c in per.items()
                          if p != "base" and c is not None]
            print(f"{op:5s} {dtype_name:8s} {mode:16s} M={tokens:<4d} " + "  ".join(cells), flush=True)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={args.k} N={args.n} r={args.r}, "
          f"{args.rounds} rounds", flush=True)
    for op, dtype_name, mode, tokens in _configs(args):
        dtype = DTYPES[dtype_name]
        if args.profile:
            import cProfile
            import pstats

            step = build_step(op, args.profile, dtype, mode, tokens, args.k, args.n, args.r)
            for _ in range(3):
                step()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls or 200):
                step()
            profiler.disable()
            print(f"== {op} {dtype_name} {mode} M={tokens} {args.profile}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            continue
        steps = {p: build_step(op, p, dtype, mode, tokens, args.k, args.n, args.r) for p in args.providers}
        calls = args.calls
        if calls is None:
            start = time.perf_counter()
            steps["base" if "base" in steps else args.providers[0]]()
            calls = max(1, min(200, int(0.02 / max(time.perf_counter() - start, 1e-6))))
        for line in report_timings(op, dtype_name, mode, tokens, time_interleaved(steps, args.rounds, calls)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
