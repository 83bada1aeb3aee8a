"""Device ceilings measured in the same run: a big copy, a big read and a big matmul.

Every result's achieved GB/s and GFLOP/s is divided by these, so a number is
read as "x% of what this machine does at its best", not as bare speed. The
matmul is measured in every input dtype of the run; a row is compared with the
ceiling of its own input dtype (so a provider that quietly computes in a
faster, less precise dtype can land above 100%, and is flagged).

Bandwidth: the copy counts bytes read plus bytes written; a kernel that mostly
reads (a GEMV streaming its weight) can beat that on CPUs, where each written
line is also read first, so the read-only sum is measured too and the larger
of the two is the bandwidth ceiling. Data that stays in cache between calls
(small weights on CPU) can still exceed it: more than 100% means "from cache".
"""
from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def bandwidth_gbps(self) -> float:
        return max(self.copy_gbps, self.read_gbps)

    def flops_for(self, dtype: str) -> float:
        return self.matmul_gflops[dtype]

    def as_dict(self) -> dict:
        return {**self.__dict__, "bandwidth_gbps": self.bandwidth_gbps}


def matmul_text(ceilings: dict) -> str:
    """``float32 matmul 186 GFLOP/s, bfloat16 matmul 410 GFLOP/s (2048³)`` from ``Ceilings.as_dict()``."""
    flops = ceilings["matmul_gflops"]
    if not isinstance(flops, dict):  # results written before ceilings were per dtype
        flops = {ceilings.get("matmul_dtype", "?"): flops}
    return ", ".join(f"{d} matmul {g:.0f} GFLOP/s" for d, g in flops.items()) + f" ({ceilings['matmul_size']}³)"


def measure_ceilings(device: torch.device, dtypes: list, level: str, policy: Policy) -> Ceilings:
    """Copy and read bandwidth, and a square matmul in each of ``dtypes`` (torch dtypes)."""
    copy_bytes, n = _SIZES[(device.type, level)]
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    copy = measure(lambda i: dst.copy_(src), lambda i: None, device, policy)
    del dst
    words = src.view(torch.float32)
    read = measure(lambda i: words.sum(), lambda i: None, device, policy)
    del src, words
    flops = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        mm = measure(lambda i: torch.mm(a, b, out=out), lambda i: None, device, policy)
        flops[str(dtype).replace("torch.", "")] = 2 * n**3 / mm.median_s / 1e9
        del a, b, out
    return Ceilings(
        copy_gbps=2 * copy_bytes / copy.median_s / 1e9,  # read + write
        read_gbps=copy_bytes / read.median_s / 1e9,
        matmul_gflops=flops,
        copy_bytes=copy_bytes,
        matmul_size=n,
    )
