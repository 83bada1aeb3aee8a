"""What an op's benchmark file declares: its shapes, inputs, providers and work.

An op plugs into the suite with one file in ``benchmarks/ops/`` that builds an
``OpBench`` named ``OP`` (the suite finds it by its file name). The runner does
the rest: timing, memory, ceilings, errors against float64, ratios, tables,
CSV/JSON and plots.

A provider is one way of computing the op (fastpeft, HF PEFT, bitsandbytes,
plain torch, ``torch.compile``...). ``Provider.build(case)`` returns a
``Built`` whose ``fn(x)`` computes the op's output for one input ``x``; the
harness calls it in the mode asked for (forward without grad, backward, or
forward+backward) and rotates ``x`` among ``case.xs``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

FORWARD = "forward"
BACKWARD = "backward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, BACKWARD, FORWARD_BACKWARD)

LEVELS = ("quick", "default", "full")


@dataclass
class Case:
    """Inputs of one (shape, mode) measurement, shared by every provider.

    ``xs`` are the rotating inputs (they need grad in the backward modes),
    ``dy`` the upstream gradient, ``tensors`` the op's other tensors (weights,
    adapters...); trainable ones already have ``requires_grad`` set.
    """

    shape: dict
    device: torch.device
    dtype: torch.dtype
    mode: str
    xs: list
    dy: Optional[Tensor]
    tensors: dict


@dataclass
class Built:
    """A provider ready to run: ``fn(x) -> y`` and the tensors whose grads it makes."""

    fn: Callable[[Tensor], Tensor]
    grad_tensors: list = field(default_factory=list)
    note: str = ""


@dataclass
class Provider:
    """One implementation of an op.

    ``unavailable()`` returns why it cannot run here (a failed import...), or
    None. ``ours`` marks fastpeft: an exception there fails the command.
    """

    name: str
    build: Callable[[Case], Built]
    unavailable: Callable[[], Optional[str]] = lambda: None
    ours: bool = False
    modes: tuple = MODES


@dataclass
class OpBench:
    """Everything the runner needs to benchmark one op.

    - ``shapes(device_type, level)``: list of shape dicts; ``x_key`` names the
      entry plotted on the x axis (tokens), the others form a shape group.
    - ``make_case(shape, device, dtype, mode, n_rotate)``: the inputs.
    - ``work(shape, mode, provider, dtype)``: (flops, bytes) an ideal kernel
      does for that provider; used for achieved GFLOP/s and GB/s.
    - ``baseline``: provider the overhead ratio divides by (the frozen base
      layer), ``reference``: provider whose forward output the others are
      compared with, ``ours``: the fastpeft provider.
    - ``headline``: providers of the one-table summary at the top of
      summary.md (per mode: the baseline's time, fastpeft's ratio to it, and
      fastpeft's speedup over each other headline provider at equal precision).
    - ``dtypes(device_type, level)``: names of the input dtypes to run
      (``"float32"``, ``"bfloat16"``, ``"float16"``); None runs the device's
      default (bfloat16 on CUDA, float32 on CPU). ``--dtype`` overrides it.
    - ``baseline_is_peer``: the baseline is itself what a user would otherwise run (AdapterHub's math for
      the adapter, not a frozen base layer): it also gets fastpeft's speedup over it, and a plot line.
    """

    name: str
    title: str
    providers: list
    shapes: Callable[[str, str], list]
    make_case: Callable[..., Case]
    work: Callable[..., tuple]
    modes: tuple = MODES
    baseline: Optional[str] = None
    reference: Optional[str] = None
    ours: str = "fastpeft"
    x_key: str = "tokens"
    headline: tuple = ()
    dtypes: Optional[Callable[[str, str], tuple]] = None
    baseline_is_peer: bool = False

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"op {self.name!r} has no provider {name!r}")

    def shape_label(self, shape: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in shape.items())

    def group_label(self, shape: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in shape.items() if k != self.x_key)


def requires_grad_in(mode: str) -> bool:
    return mode != FORWARD
