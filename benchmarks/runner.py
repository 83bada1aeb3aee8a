"""Runs the suite: every (op, shape, mode, provider), one result row each.

For each (op, shape, mode) the inputs are made once and shared by all
providers. Each provider is built, called once untimed (compiles, caches,
lazy init; the time is kept as ``first_call_s``), checked against the op's
reference provider on the forward output, then timed by the harness, and its
memory measured. Ratios (overhead over the baseline, fastpeft's speedup over
each provider) and the fractions of the measured ceilings are added at the end.

A provider that cannot be imported gives a "not available" row; an exception
while building or running gives an "error" row with the message. Errors of
fastpeft itself, and fastpeft results that disagree with the reference, are
counted as failures so the command can exit non-zero.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

from .ceilings import Ceilings
from .harness import Policy, measure
from .memory import cuda_peak_bytes, saved_bytes
from .spec import BACKWARD, FORWARD, FORWARD_BACKWARD, Built, Case, OpBench

OK, NOT_AVAILABLE, ERROR, WRONG = "ok", "not available", "error", "wrong result"
MAX_REL_ERR = 5e-2  # forward output vs the reference provider; quantization error is far below this


@dataclass
class Task:
    op: OpBench
    shape: dict
    mode: str


@dataclass
class SuiteResult:
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def shapes_for(op: OpBench, device_type: str, level: str, tokens: Optional[list] = None,
               dims: Optional[list] = None) -> list:
    """The op's shapes for ``level``, with the token counts and/or shape groups replaced.

    ``dims`` is a list of dicts such as ``{"K": 1024, "N": 1024, "r": 16}``;
    keys the op does not use are ignored and keys it needs but that are not
    given keep the value of the op's first default shape.
    """
    shapes = op.shapes(device_type, level)
    if tokens is None and dims is None:
        return shapes
    default_group = {k: v for k, v in shapes[0].items() if k != op.x_key}
    groups = []
    for shape in shapes:
        group = {k: v for k, v in shape.items() if k != op.x_key}
        if group not in groups:
            groups.append(group)
    if dims is not None:
        groups = []
        for d in dims:
            group = {k: d.get(k, v) for k, v in default_group.items()}
            if group not in groups:
                groups.append(group)
    if tokens is None:
        tokens = sorted({s[op.x_key] for s in shapes})
    return [{op.x_key: m, **g} for g in groups for m in tokens]


def plan(ops: list, device_type: str, level: str, modes: Optional[list] = None, tokens: Optional[list] = None,
         dims: Optional[list] = None) -> list:
    """Every (op, shape, mode) to run, in order."""
    return [Task(op, shape, mode)
            for op in ops
            for shape in shapes_for(op, device_type, level, tokens, dims)
            for mode in op.modes if modes is None or mode in modes]


def selected_providers(op: OpBench, names: Optional[list]) -> list:
    """The op's providers that ``names`` asks for; the baseline and reference always run."""
    if not names:
        return list(op.providers)
    keep = set(names) | {op.baseline, op.reference}
    return [p for p in op.providers if p.name in keep]


def make_steps(built: Built, case: Case):
    """``(prepare(i), step(i))`` for the case's mode; ``i`` picks the rotating input."""
    xs, dy, n = case.xs, case.dy, len(case.xs)

    def clear_grads():
        for t in list(built.grad_tensors) + list(xs):
            t.grad = None

    if case.mode == FORWARD:
        def step(i):
            with torch.no_grad():
                built.fn(xs[i % n])

        return (lambda i: None), step
    if case.mode == BACKWARD:
        pending = []

        def prepare(i):
            clear_grads()
            pending.append(built.fn(xs[i % n]))

        return prepare, (lambda i: pending.pop().backward(dy))
    if case.mode == FORWARD_BACKWARD:
        def step(i):
            built.fn(xs[i % n]).backward(dy)

        return (lambda i: clear_grads()), step
    raise ValueError(f"unknown mode {case.mode!r}")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300))


def _forward_output(built: Built, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return built.fn(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(task: Task, provider, case_dtype, device, status, note="") -> dict:
    role = "baseline" if provider.name == task.op.baseline else "fastpeft" if provider.ours else "peer"
    return dict(op=task.op.name, mode=task.mode, provider=provider.name, ours=provider.ours, role=role,
                shape=task.op.shape_label(task.shape), group=task.op.group_label(task.shape),
                tokens=task.shape.get(task.op.x_key), dims=dict(task.shape),
                dtype=str(case_dtype).replace("torch.", ""), device=str(device), status=status, note=note)


def run_task(task: Task, providers: list, device: torch.device, dtype: torch.dtype, policy: Policy,
             ceilings: Ceilings, progress=None) -> list:
    """Rows for one (op, shape, mode), one per provider in ``providers``."""
    case = task.op.make_case(task.shape, device, dtype, task.mode)
    reference = None
    if task.mode == FORWARD and task.op.reference:
        try:
            ref_provider = task.op.provider(task.op.reference)
            if ref_provider.unavailable() is None:
                reference = _forward_output(ref_provider.build(case), case.xs[0])
        except Exception:
            reference = None
    rows = []
    for provider in providers:
        if progress is not None:
            progress.set_postfix_str(f"{task.op.name} {task.mode} {task.op.shape_label(task.shape)} {provider.name}")
        reason = provider.unavailable()
        if reason is not None:
            rows.append(_row(task, provider, dtype, device, NOT_AVAILABLE, reason))
        elif task.mode not in provider.modes:
            rows.append(_row(task, provider, dtype, device, NOT_AVAILABLE, f"no {task.mode} mode"))
        else:
            rows.append(_run_provider(task, provider, case, reference, device, policy))
        if progress is not None:
            progress.update(1)
    _add_ratios(task.op, rows)
    for row in rows:
        _add_roofline(task, row, dtype, ceilings)
    del case
    return rows


def _run_provider(task, provider, case, reference, device, policy) -> dict:
    row = _row(task, provider, case.dtype, device, OK)
    try:
        built = provider.build(case)
        row["note"] = built.note
        prepare, step = make_steps(built, case)
        t0 = time.perf_counter()
        prepare(0)
        step(0)
        _sync(device)
        row["first_call_s"] = time.perf_counter() - t0
        if reference is not None and row["role"] != "baseline":  # the baseline computes something else
            row["rel_err"] = _rel_err(_forward_output(built, case.xs[0]), reference)
        timing = measure(step, prepare, device, policy)
        row.update(median_ms=timing.median_s * 1e3, q25_ms=timing.q25_s * 1e3, q75_ms=timing.q75_s * 1e3,
                   iqr_pct=100 * timing.iqr_fraction, reps=timing.reps)
        row.update(_memory(built, case, prepare, step, device))
    except Exception as exc:
        row.update(status=ERROR, note=f"{type(exc).__name__}: {exc}".strip(),
                   traceback=traceback.format_exc(limit=8))
        return row
    if provider.ours and row.get("rel_err", 0.0) > MAX_REL_ERR:
        row.update(status=WRONG, note=f"forward differs from {task.op.reference}: rel err {row['rel_err']:.3g}")
    return row


def _memory(built: Built, case: Case, prepare, step, device) -> dict:
    out = {}
    if case.mode == FORWARD_BACKWARD:
        existing = list(case.xs) + list(built.grad_tensors) + _tensors_in(case.tensors.values())
        prepare(0)
        out["saved_mb"] = saved_bytes(lambda: built.fn(case.xs[0]), existing) / 2**20
    if device.type == "cuda":
        prepare(0)
        out["peak_mb"] = cuda_peak_bytes(lambda: step(0), device) / 2**20
    return out


def _tensors_in(values) -> list:
    """Tensors among ``values`` and among the attributes of non-tensor values (e.g. an NF4Weight's buffers)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        else:
            out += [t for t in vars(v).values() if isinstance(t, torch.Tensor)] if hasattr(v, "__dict__") else []
    return out


def _add_ratios(op: OpBench, rows: list) -> None:
    times = {r["provider"]: r["median_ms"] for r in rows if r["status"] == OK}
    base, ours = times.get(op.baseline), times.get(op.ours)
    for r in rows:
        if r["status"] != OK:
            continue
        if base:
            r["overhead"] = r["median_ms"] / base
        if ours:
            r["fastpeft_speedup"] = r["median_ms"] / ours


def _add_roofline(task: Task, row: dict, dtype, ceilings: Ceilings) -> None:
    if row["status"] != OK:
        return
    flops, nbytes = task.op.work(task.shape, task.mode, row["provider"], dtype)
    seconds = row["median_ms"] / 1e3
    row.update(gflops=flops / seconds / 1e9, gbps=nbytes / seconds / 1e9)
    row["pct_peak_flops"] = 100 * row["gflops"] / ceilings.matmul_gflops
    row["pct_peak_bw"] = 100 * row["gbps"] / ceilings.bandwidth_gbps


def failures_in(rows: list) -> list:
    """fastpeft rows that failed: errors and wrong results."""
    return [r for r in rows if r["ours"] and r["status"] in (ERROR, WRONG)]
