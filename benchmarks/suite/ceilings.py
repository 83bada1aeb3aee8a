"""Device ceilings measured in the same run: a big copy, a big read and a big matmul.

Every result's achieved GB/s and GFLOP/s is divided by these, so a number is
read as "x% of what this machine does at its best", not as bare speed. The
matmul is measured in every input dtype of the run; a row is compared with the
ceiling of its own input dtype (so a provider that quietly computes in a
faster, less precise dtype can land above 100%, and is flagged).

Bandwidth: the copy counts bytes read plus bytes written; a kernel that mostly
reads (a GEMV streaming its weight) can beat that on CPUs, where each written
line is also read first, so the read-only sum is measured too and the larger
of the two is the bandwidth ceiling.

Caches: a CPU keeps a working set that fits its last-level cache between
calls (this machine's L3 holds every weight of the suite), and such a row
would beat the DRAM ceiling without being wrong or noisy. So on a CPU the read
bandwidth of a buffer resident in the last-level cache is measured too, and a
row whose bytes fit in half that cache is compared with it
(``bandwidth_for``). GPU timings flush L2 between repetitions: DRAM only.

Matmul: the faster of two square sizes (the big one and half of it), since a
mid-sized product can run faster than the big one when its panels stay in
cache; a ceiling is the best this machine does, not one shape's speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .harness import Policy, measure

# (copy bytes, square matmul size) per device type and level.
_SIZES = {
    ("cpu", "quick"): (32 * 2**20, 512),
    ("cpu", "default"): (256 * 2**20, 2048),
    ("cpu", "full"): (512 * 2**20, 4096),
    ("cuda", "quick"): (256 * 2**20, 4096),
    ("cuda", "default"): (1024 * 2**20, 8192),
    ("cuda", "full"): (2048 * 2**20, 16384),
}


@dataclass(frozen=True)
class Ceilings:
    """Measured ceilings; ``matmul_gflops`` maps a dtype name to its big-matmul GFLOP/s."""

    copy_gbps: float
    read_gbps: float
    matmul_gflops: dict
    copy_bytes: int
    matmul_size: int
    cache_read_gbps: float = 0.0
    cache_bytes: int = 0

    @property
    def bandwidth_gbps(self) -> float:
        """The DRAM (GPU: HBM) ceiling: the larger of copy and read."""
        return max(self.copy_gbps, self.read_gbps)

    def bandwidth_for(self, nbytes: float) -> float:
        """The ceiling for a call moving ``nbytes``: cache-resident reads when they fit in half the cache."""
        if self.cache_bytes and nbytes <= self.cache_bytes // 2:
            return max(self.cache_read_gbps, self.bandwidth_gbps)
        return self.bandwidth_gbps

    def flops_for(self, dtype: str) -> float:
        return self.matmul_gflops[dtype]

    def as_dict(self) -> dict:
        return {**self.__dict__, "bandwidth_gbps": self.bandwidth_gbps}


def matmul_text(ceilings: dict) -> str:
    """``float32 matmul 186 GFLOP/s, ... (best of 1024³ and 2048³)`` from ``Ceilings.as_dict()``."""
    flops = ceilings["matmul_gflops"]
    if not isinstance(flops, dict):  # results written before ceilings were per dtype
        flops = {ceilings.get("matmul_dtype", "?"): flops}
    n = ceilings["matmul_size"]
    return ", ".join(f"{d} matmul {g:.0f} GFLOP/s" for d, g in flops.items()) + f" (best of {n // 2}³ and {n}³)"


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs), 0 when it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


def _read_gbps(nbytes: int, device: torch.device, policy: Policy) -> float:
    words = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    return nbytes / measure(lambda i: words.sum(), lambda i: None, device, policy).median_s / 1e9


def _matmul_gflops(n: int, dtype, device: torch.device, policy: Policy) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n**3 / measure(lambda i: torch.mm(a, b, out=out), lambda i: None, device, policy).median_s / 1e9


def measure_ceilings(device: torch.device, dtypes: list, level: str, policy: Policy) -> Ceilings:
    """Copy and read bandwidth (and on CPU cache-resident reads), and square matmuls in each of ``dtypes``."""
    copy_bytes, n = _SIZES[(device.type, level)]
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    copy = measure(lambda i: dst.copy_(src), lambda i: None, device, policy)
    del src, dst
    read_gbps = _read_gbps(copy_bytes, device, policy)
    cache_bytes = last_level_cache_bytes() if device.type == "cpu" else 0
    # a quarter of the cache: resident after the first pass, yet far bigger than L1/L2
    cache_read_gbps = _read_gbps(cache_bytes // 4, device, policy) if cache_bytes >= 2**20 else 0.0
    flops = {str(dtype).replace("torch.", ""): max(_matmul_gflops(size, dtype, device, policy) for size in (n, n // 2))
             for dtype in dtypes}
    return Ceilings(
        copy_gbps=2 * copy_bytes / copy.median_s / 1e9,  # read + write
        read_gbps=read_gbps,
        matmul_gflops=flops,
        copy_bytes=copy_bytes,
        matmul_size=n,
        cache_read_gbps=cache_read_gbps,
        cache_bytes=cache_bytes,
    )
