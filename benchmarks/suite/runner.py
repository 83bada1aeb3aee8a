"""Runs the suite: every (op, dtype, shape, mode, provider), one result row each.

For each (op, dtype, shape, mode) the inputs are made once and shared by all
providers. Each provider is built, called once untimed (compiles, caches,
lazy init; the time is kept as ``first_call_s``), its forward output compared
with a float64 run of the op's reference provider (``rel_err``, and from it the
``compute_dtype`` it effectively used: ``benchmarks/suite/precision.py``), then timed
by the harness, and its memory measured. The overhead over the baseline and the
fractions of the measured ceilings are added per case; fastpeft's speedup over
each peer is added once all dtypes of an op have run, against the fastpeft row
that computes at the same precision as the peer (``add_speedups``). Rows that
are noisy or faster than a measured ceiling get ``flags`` (``add_flags``).

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
from .precision import compute_dtype, float64_case, rel_err
from .spec import BACKWARD, FORWARD, FORWARD_BACKWARD, Built, Case, OpBench

OK, NOT_AVAILABLE, ERROR, WRONG = "ok", "not available", "error", "wrong result"
MAX_REL_ERR = 5e-2  # forward output vs the float64 reference; bf16 rounding is far below this
NOISY_IQR_PCT = 10.0  # interquartile range over the median above which a time is flagged
NOISY, ABOVE_CEILING = "noisy", "above ceiling"


@dataclass
class Task:
    op: OpBench
    shape: dict
    mode: str
    dtype: torch.dtype


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtypes_for(op: OpBench, device_type: str, level: str, default: torch.dtype,
               override: Optional[list] = None) -> list:
    """The torch dtypes to run ``op`` in: ``override`` (names) if given, else the op's, else ``default``."""
    names = override or (op.dtypes(device_type, level) if op.dtypes is not None else None)
    return [DTYPES[n] for n in names] if names else [default]


def plan(ops: list, device_type: str, level: str, modes: Optional[list] = None, tokens: Optional[list] = None,
         dims: Optional[list] = None, default_dtype: torch.dtype = torch.float32,
         dtypes: Optional[list] = None) -> list:
    """Every (op, dtype, shape, mode) to run, in order (all of an op's tasks together)."""
    return [Task(op, shape, mode, dtype)
            for op in ops
            for dtype in dtypes_for(op, device_type, level, default_dtype, dtypes)
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


def _forward_output(built: Built, x: torch.Tensor, mode: str = FORWARD) -> torch.Tensor:
    """The forward output, computed the way ``mode`` runs it (with autograd in the backward modes,
    so a compiled provider meets no grad mode that its timed calls do not), detached."""
    with torch.set_grad_enabled(mode != FORWARD):
        return built.fn(x).detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(task: Task, provider, case_dtype, device, status, note="") -> dict:
    role = "baseline" if provider.name == task.op.baseline else "fastpeft" if provider.ours else "peer"
    return dict(op=task.op.name, mode=task.mode, provider=provider.name, ours=provider.ours, role=role,
                shape=task.op.shape_label(task.shape), group=task.op.group_label(task.shape),
                tokens=task.shape.get(task.op.x_key), dims=dict(task.shape),
                dtype=str(case_dtype).replace("torch.", ""), device=str(device), status=status, note=note)


def float64_outputs(op: OpBench, case: Case) -> dict:
    """``{provider: float64 forward output}`` for the op's reference and baseline providers.

    Each is first built on ``case`` itself, so that weights derived from the
    case (NF4 codes...) exist and are shared with the float64 copy. A provider
    that cannot run in float64 is left out: ``out["_failures"]`` says why,
    and its rows get no error and a note.
    """
    out, failures = {}, {}
    for name in dict.fromkeys(n for n in (op.reference, op.baseline) if n):
        provider = op.provider(name)
        reason = provider.unavailable()
        if reason is not None:
            failures[name] = reason
            continue
        try:
            provider.build(case)
            case64 = float64_case(case)
            out[name] = _forward_output(provider.build(case64), case64.xs[0])
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}".strip()
    out["_failures"] = failures
    return out


def run_task(task: Task, providers: list, device: torch.device, policy: Policy, ceilings: Ceilings,
             progress=None) -> list:
    """Rows for one (op, dtype, shape, mode), one per provider in ``providers``."""
    dtype = task.dtype
    case = task.op.make_case(task.shape, device, dtype, task.mode)
    references = float64_outputs(task.op, case)
    rows = []
    for provider in providers:
        if progress is not None:
            progress.set_postfix_str(f"{task.op.name} {task.mode} {_dtype_name(dtype)} "
                                     f"{task.op.shape_label(task.shape)} {provider.name}")
        reason = provider.unavailable()
        if reason is not None:
            rows.append(_row(task, provider, dtype, device, NOT_AVAILABLE, reason))
        elif task.mode not in provider.modes:
            rows.append(_row(task, provider, dtype, device, NOT_AVAILABLE, f"no {task.mode} mode"))
        else:
            rows.append(_run_provider(task, provider, case, references, device, policy))
        if progress is not None:
            progress.update(1)
    _add_overheads(task.op, rows)
    for row in rows:
        _add_roofline(task, row, dtype, ceilings)
    del case
    return rows


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run_provider(task, provider, case, references, device, policy) -> dict:
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
        # the baseline computes something else: it is compared with its own float64 run
        ref_name = task.op.baseline if row["role"] == "baseline" else task.op.reference
        reference = references.get(ref_name)
        if reference is not None:
            row["rel_err"] = rel_err(_forward_output(built, case.xs[0], case.mode), reference)
            row["compute_dtype"] = compute_dtype(row["rel_err"], row["dtype"])
        elif ref_name in references["_failures"]:
            why = f"no float64 {ref_name} run, so no error: {references['_failures'][ref_name]}"
            row["note"] = f"{row['note']}; {why}" if row["note"] else why
        timing = measure(step, prepare, device, policy)
        row.update(median_ms=timing.median_s * 1e3, q25_ms=timing.q25_s * 1e3, q75_ms=timing.q75_s * 1e3,
                   iqr_pct=100 * timing.iqr_fraction, reps=timing.reps)
        row.update(_memory(built, case, prepare, step, device))
    except Exception as exc:
        row.update(status=ERROR, note=f"{type(exc).__name__}: {exc}".strip(),
                   traceback=traceback.format_exc(limit=8))
        return row
    if provider.ours and row["role"] != "baseline" and row.get("rel_err", 0.0) > MAX_REL_ERR:
        row.update(status=WRONG, note=f"forward differs from float64 {task.op.reference}: rel err {row['rel_err']:.3g}")
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


def _add_overheads(op: OpBench, rows: list) -> None:
    """``overhead``: each provider's time over the baseline's, same case."""
    times = {r["provider"]: r["median_ms"] for r in rows if r["status"] == OK}
    base = times.get(op.baseline)
    for r in rows:
        if r["status"] == OK and base:
            r["overhead"] = r["median_ms"] / base


def _precision_of(row: dict) -> str:
    """The precision a row computed at: its measured compute dtype, else its input dtype."""
    return row.get("compute_dtype") or {"float16": "tf32/float16"}.get(row["dtype"], row["dtype"])


def add_speedups(op: OpBench, rows: list) -> None:
    """``fastpeft_speedup`` (peer time / fastpeft time) on each peer row of ``op``, at equal precision.

    The fastpeft row it divides by has the same shape and mode and computes at
    the peer's precision; the one with the peer's input dtype when there is
    one, else fastpeft run in the dtype the peer effectively computed in (a
    float32 peer that computes in bfloat16 is compared with fastpeft in
    bfloat16). ``speedup_vs`` names that fastpeft row's input dtype; without a
    match the ratio is left out and ``speedup_vs`` says why. fastpeft rows get 1.
    Run ``add_flags`` first: ``speedup_vs_flags`` copies the flags of the fastpeft row divided by.
    ``speedup_same_inputs`` is the plain ratio to fastpeft on the same inputs,
    whatever precision either computed at (for the record; tables show the first).
    """
    ours, same_inputs = {}, {}
    for r in rows:
        if r["op"] == op.name and r["provider"] == op.ours and r["status"] == OK:
            ours.setdefault((r["shape"], r["mode"], _precision_of(r)), []).append(r)
            same_inputs[(r["shape"], r["mode"], r["dtype"])] = r
    for r in rows:
        if r["op"] != op.name or r["status"] != OK:
            continue
        if r["provider"] == op.ours:
            r["fastpeft_speedup"], r["speedup_vs"] = 1.0, r["dtype"]
            continue
        if r["role"] != "peer" and not (r["role"] == "baseline" and op.baseline_is_peer):
            continue
        plain = same_inputs.get((r["shape"], r["mode"], r["dtype"]))
        if plain is not None:
            r["speedup_same_inputs"] = r["median_ms"] / plain["median_ms"]
        matches = ours.get((r["shape"], r["mode"], _precision_of(r)), [])
        match = next((m for m in matches if m["dtype"] == r["dtype"]), matches[0] if matches else None)
        if match is None:
            r["speedup_vs"] = f"no fastpeft row at {_precision_of(r)}"
            continue
        r["fastpeft_speedup"] = r["median_ms"] / match["median_ms"]
        r["speedup_vs"] = match["dtype"]
        r["speedup_vs_flags"] = match.get("flags", "")  # a ratio is as shaky as either of its times


def add_flags(rows: list) -> None:
    """``flags``: "noisy" (IQR above 10% of the median), "above ceiling" (faster than a measured ceiling)."""
    for r in rows:
        if r["status"] != OK:
            continue
        flags = []
        if r["iqr_pct"] > NOISY_IQR_PCT:
            flags.append(NOISY)
        if r["pct_peak_flops"] > 100 or r["pct_peak_bw"] > 100:
            flags.append(ABOVE_CEILING)
        r["flags"] = "; ".join(flags)


def _add_roofline(task: Task, row: dict, dtype, ceilings: Ceilings) -> None:
    if row["status"] != OK:
        return
    flops, nbytes = task.op.work(task.shape, task.mode, row["provider"], dtype)
    seconds = row["median_ms"] / 1e3
    row.update(gflops=flops / seconds / 1e9, gbps=nbytes / seconds / 1e9)
    row["pct_peak_flops"] = 100 * row["gflops"] / ceilings.flops_for(_dtype_name(dtype))
    row["pct_peak_bw"] = 100 * row["gbps"] / ceilings.bandwidth_for(nbytes)


def failures_in(rows: list) -> list:
    """fastpeft rows that failed: errors and wrong results."""
    return [r for r in rows if r["ours"] and r["status"] in (ERROR, WRONG)]


def headline_rows(ops: list, rows: list) -> list:
    """The rows the headline tables are made of: each op's headline providers."""
    wanted = {(op.name, p) for op in ops for p in op.headline}
    return [r for r in rows if (r["op"], r["provider"]) in wanted]


def flagged(rows: list) -> list:
    return [r for r in rows if r.get("flags")]
