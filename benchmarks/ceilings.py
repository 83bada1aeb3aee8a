"""Device ceilings measured in the same run: a big copy, a big read and a big matmul.

Every result's achieved GB/s and GFLOP/s is divided by these, so a number is
read as "x% of what this machine does at its best", not as bare speed.

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
    copy_gbps: float
    read_gbps: float
    matmul_gflops: float
    copy_bytes: int
    matmul_size: int
    matmul_dtype: str

    @property
    def bandwidth_gbps(self) -> float:
        return max(self.copy_gbps, self.read_gbps)

    def as_dict(self) -> dict:
        return {**self.__dict__, "bandwidth_gbps": self.bandwidth_gbps}


def measure_ceilings(device: torch.device, dtype: torch.dtype, level: str, policy: Policy) -> Ceilings:
    copy_bytes, n = _SIZES[(device.type, level)]
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    copy = measure(lambda i: dst.copy_(src), lambda i: None, device, policy)
    del dst
    words = src.view(torch.float32)
    read = measure(lambda i: words.sum(), lambda i: None, device, policy)
    del src, words
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    mm = measure(lambda i: torch.mm(a, b, out=out), lambda i: None, device, policy)
    return Ceilings(
        copy_gbps=2 * copy_bytes / copy.median_s / 1e9,  # read + write
        read_gbps=copy_bytes / read.median_s / 1e9,
        matmul_gflops=2 * n**3 / mm.median_s / 1e9,
        copy_bytes=copy_bytes,
        matmul_size=n,
        matmul_dtype=str(dtype).replace("torch.", ""),
    )
