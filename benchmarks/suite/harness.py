"""Timing: warm-up, then repeats until a time budget, median and quartiles.

Each repetition has an untimed ``prepare(i)`` (clear grads, run the forward
that a backward-only measurement needs, flush the GPU L2) and a timed
``step(i)``; ``i`` lets the caller rotate among several input buffers so a
cache that still holds the last input does not flatter anyone.

- CPU: ``time.perf_counter`` around each step.
- CUDA: a pair of CUDA events around each step, recorded on the current
  stream of the measured device (not of whichever GPU is current), read
  after one final sync. Before each step the L2 cache is flushed by *reading*
  a buffer twice its size: the lines left behind are clean, so no write-back
  of flush data lands in the timed window.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Policy:
    """How long to measure: at least ``min_reps`` and about ``min_time_s`` in total."""

    warmup_s: float
    min_time_s: float
    min_reps: int
    max_reps: int


POLICIES = {
    ("cpu", "quick"): Policy(warmup_s=0.0, min_time_s=0.02, min_reps=3, max_reps=10),
    ("cpu", "default"): Policy(warmup_s=0.05, min_time_s=0.2, min_reps=5, max_reps=200),
    ("cpu", "full"): Policy(warmup_s=0.2, min_time_s=1.0, min_reps=15, max_reps=1000),
    ("cuda", "quick"): Policy(warmup_s=0.02, min_time_s=0.05, min_reps=10, max_reps=100),
    ("cuda", "default"): Policy(warmup_s=0.05, min_time_s=0.2, min_reps=25, max_reps=1000),
    ("cuda", "full"): Policy(warmup_s=0.1, min_time_s=0.5, min_reps=50, max_reps=5000),
}


@dataclass(frozen=True)
class Timing:
    median_s: float
    q25_s: float
    q75_s: float
    reps: int

    @property
    def iqr_fraction(self) -> float:
        """Spread: interquartile range over the median."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else float("nan")


def summarize(samples: list) -> Timing:
    ordered = sorted(samples)
    if len(ordered) >= 4:
        q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q25, q75 = ordered[0], ordered[-1]
    return Timing(statistics.median(ordered), q25, q75, len(ordered))


class L2Flusher:
    """Evicts the GPU L2 cache by reading a buffer twice its size (a no-op on CPU).

    A read leaves clean lines: dirty lines of the previous step are written back
    during the flush, and the flush's own lines need no write-back later.
    """

    def __init__(self, device: torch.device):
        self.buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.buffer = torch.ones(2 * l2 // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.sum()


def measure(step: Callable[[int], object], prepare: Callable[[int], object], device: torch.device,
            policy: Policy) -> Timing:
    """Time ``step`` under ``policy``; ``prepare`` runs untimed before each step."""
    if device.type == "cuda":
        return _measure_cuda(step, prepare, device, policy)
    return _measure_cpu(step, prepare, policy)


def _reps_for(estimate_s: float, policy: Policy) -> int:
    if estimate_s <= 0:
        return policy.max_reps
    return max(policy.min_reps, min(policy.max_reps, int(policy.min_time_s / estimate_s) + 1))


def _measure_cpu(step, prepare, policy: Policy) -> Timing:
    warm_samples = []
    started = time.perf_counter()
    while not warm_samples or time.perf_counter() - started < policy.warmup_s:
        i = len(warm_samples)
        prepare(i)
        t0 = time.perf_counter()
        step(i)
        warm_samples.append(time.perf_counter() - t0)
    samples = []
    for i in range(_reps_for(min(warm_samples), policy)):
        prepare(i)
        t0 = time.perf_counter()
        step(i)
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def _measure_cuda(step, prepare, device: torch.device, policy: Policy) -> Timing:
    with torch.cuda.device(device):
        return _measure_on_current_cuda_device(step, prepare, device, policy)


def _measure_on_current_cuda_device(step, prepare, device: torch.device, policy: Policy) -> Timing:
    flush = L2Flusher(device)
    stream = torch.cuda.current_stream(device)

    def run(n: int) -> list:
        pairs = []
        for i in range(n):
            prepare(i)
            flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            step(i)
            end.record(stream)
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in pairs]

    warm = run(3)
    elapsed = sum(warm)
    while elapsed < policy.warmup_s:
        more = run(3)
        warm += more
        elapsed += sum(more)
    return summarize(run(_reps_for(statistics.median(warm), policy)))
