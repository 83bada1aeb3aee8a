"""Memory of one step, measured the same way for every provider.

Two figures:
- ``saved_mb`` (any device): bytes of the tensors autograd keeps between
  forward and backward (``torch.autograd.graph.saved_tensors_hooks``), not
  counting storage that was already alive before the step (inputs, weights).
  It is the activation memory a layer adds to a training step. Tensors an
  implementation keeps outside autograd are not seen; on CPU this is the
  honest figure we have (the CPU allocator keeps no peak counter).
- ``peak_mb`` (CUDA only): ``torch.cuda.max_memory_allocated`` during the
  step minus what was allocated before it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def saved_bytes(step: Callable[[], torch.Tensor], existing: list) -> int:
    """Bytes autograd saves during ``step()`` in storages not among ``existing``."""
    known = {_storage_key(t) for t in existing}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            key = _storage_key(t)
            if key not in known:
                seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def cuda_peak_bytes(step: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra bytes allocated on ``device`` while ``step()`` runs, or None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
