"""``python -m benchmarks --op train_step``: one training step of a whole model, every method vs its peer.

A step is ``zero_grad`` + forward with the loss + backward + ``AdamW.step`` on the method's trainable
parameters (the floor has none: forward + backward only). Float32 runs the model in float32; ``bfloat16``
runs the same float32 model under ``torch.autocast(bfloat16)`` (what ``Trainer(bf16=True)`` does).

Per (model, dtype) every variant (the floor, and fastpeft and the peer for each method) is built once,
warmed up twice, then timed interleaved: each round runs every variant once, in a rotating order, so load
drifts on a shared machine hit all of them alike. Ratios are computed per round and summarised by their
median and interquartile range (``±`` is the IQR in % of the median, as in the suite's tables):
- ``peer/fastpeft``: the peer's step time over fastpeft's (above 1: fastpeft faster);
- ``overhead``: a variant's step time minus the floor's in the same round; ``fastpeft/peer overhead`` is
  fastpeft's overhead over the peer's (below 1: fastpeft adds less to the frozen model than the peer).
``peak MB``: the peak of what one untimed step allocates above what was allocated before it
(activations, gradients, temporaries; the weights and the optimizer state exist before it), from the
allocation and free events that torch's profiler records for the CPU allocator (what
``torch.cuda.max_memory_allocated`` minus the memory before the step says on a GPU).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..suite.harness import summarize
from . import methods

OP_NAME = "train_step"
TITLE = "Training step (forward, backward, AdamW) of a whole model"
MODE = "train step"
DTYPES = ("float32", "bfloat16")
ROUNDS = {"quick": 2, "default": 5, "full": 9}
MB = 2 ** 20


@dataclass
class Variant:
    method: str
    provider: str
    ours: bool
    built: Optional[methods.Built] = None
    error: Optional[str] = None
    samples: list = field(default_factory=list)
    peak_mb: Optional[float] = None
    peak_note: str = ""
    first_loss: Optional[float] = None


@dataclass(frozen=True)
class ModelSpec:
    """One model of the level: how to build it fresh and the batch it trains on."""

    name: str
    label: str
    build: object
    batch: int
    seq: int
    unavailable: Optional[str] = None


def model_specs(level: str) -> list:
    size = methods.SIZES[level]
    label = (f"Llama {size['layers']}x{size['hidden']} GQA {size['heads']}/{size['kv_heads']} "
             f"{size['batch']}x{size['seq']} tokens")
    specs = [ModelSpec("llama", label, lambda: methods.llama_model(size), size["batch"], size["seq"])]
    if level == "full":  # the pretrained row: the default run stays well under a minute without it
        b = methods.MINILM_BATCH
        specs.append(ModelSpec("minilm", f"all-MiniLM-L6-v2 (pretrained) {b['batch']}x{b['seq']} tokens",
                               methods.minilm_model, b["batch"], b["seq"], methods.minilm_unavailable()))
    return specs


def _autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step_fn(built: methods.Built, batch: dict, dtype: str):
    optimizer = torch.optim.AdamW(built.params, lr=1e-4) if built.params else None

    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = built.loss(batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    step.optimizer = optimizer
    return step


def _variants(spec: ModelSpec, dtype: str, names: Optional[list]) -> list:
    out = [Variant("floor", "torch", False)]
    fam = "llama" if spec.name == "llama" else "bert"
    for m in methods.METHODS:
        if fam not in m.families or (names and m.name not in names):
            continue
        out += [Variant(m.name, "fastpeft", True), Variant(m.name, m.peer, False)]
    for v in out:
        method = methods.FLOOR if v.method == "floor" else next(m for m in methods.METHODS if m.name == v.method)
        build = method.fastpeft if v.ours else method.peer_build
        try:
            v.built = build(spec.build(), dtype)
        except Exception as exc:  # an error row (a fastpeft one fails the command)
            v.error = _error_text(exc)
    return out


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]


def _peak_mb(step) -> tuple:
    """Peak bytes allocated during ``step()`` above what was allocated before it (MB), from the allocation
    and free events torch's profiler records for the CPU allocator; ``(None, reason)`` when it cannot."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    except Exception as exc:
        return None, f"peak not measured: {_error_text(exc)}"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / MB, ""


def run_model(spec: ModelSpec, dtype: str, rounds: int, method_names: Optional[list] = None,
              progress=None, clock=time.perf_counter) -> list:
    """Rows of one (model, dtype): every variant timed interleaved over ``rounds`` rounds by ``clock``
    (wall time; ``time.process_time``, the process's CPU time, is steadier on a loaded machine)."""
    size = {"batch": spec.batch, "seq": spec.seq}
    if spec.unavailable:
        return [_row(spec, dtype, Variant("floor", "torch", False, error=spec.unavailable), size, status="not available")]
    variants = _variants(spec, dtype, method_names)
    runnable = [v for v in variants if v.error is None]
    if not runnable:
        return [_row(spec, dtype, v, size) for v in variants]
    batch = methods.batch_for(runnable[0].built.model, spec.batch, spec.seq)
    steps = {}
    for v in runnable:
        steps[id(v)] = step = _step_fn(v.built, batch, dtype)
        try:
            with torch.no_grad(), _autocast(dtype):
                v.first_loss = float(v.built.loss(batch))
            step()
            step()
        except Exception as exc:
            v.error = _error_text(exc)
    runnable = [v for v in runnable if v.error is None]
    for r in range(rounds):
        order = runnable[r % len(runnable):] + runnable[:r % len(runnable)]
        for v in order:
            t0 = clock()
            steps[id(v)]()
            v.samples.append(clock() - t0)
        if progress is not None:
            progress(f"{spec.name} {dtype} round {r + 1}/{rounds}")
    for v in runnable:
        v.peak_mb, v.peak_note = _peak_mb(steps[id(v)])
    rows = [_row(spec, dtype, v, size) for v in variants]
    _add_ratios(rows, {id(r): v for r, v in zip(rows, variants)})
    del variants, runnable, steps
    gc.collect()
    return rows


def _row(spec: ModelSpec, dtype: str, v: Variant, size: dict, status: Optional[str] = None) -> dict:
    role = "baseline" if v.method == "floor" else "fastpeft" if v.ours else "peer"
    row = dict(op=OP_NAME, mode=MODE, provider=v.provider, ours=v.ours, role=role, method=v.method,
               model=spec.label, shape=f"{spec.label} | {v.method}", group=v.method, tokens=spec.batch * spec.seq,
               dims={"model": spec.name, **size}, dtype=dtype, device="cpu",
               status=status or ("error" if v.error else "ok"), note=v.error or v.peak_note)
    if v.samples:
        t = summarize(v.samples)
        row.update(median_ms=t.median_s * 1e3, q25_ms=t.q25_s * 1e3, q75_ms=t.q75_s * 1e3,
                   iqr_pct=100 * t.iqr_fraction, reps=t.reps, peak_mb=v.peak_mb, first_loss=v.first_loss,
                   samples_ms=[s * 1e3 for s in v.samples])
        row["flags"] = "noisy" if row["iqr_pct"] > 10 else ""
    return row


def _per_round(values: list) -> dict:
    """Median and IQR (in % of the median) of per-round values."""
    t = summarize(values)
    return {"median": t.median_s, "iqr_pct": 100 * abs(t.iqr_fraction)}


def _add_ratios(rows: list, _variants_by_row: dict) -> None:
    """Per-round overheads over the floor, ``peer/fastpeft`` and ``fastpeft/peer overhead`` (on the fastpeft row)."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("samples_ms")]
    floor = next((r for r in ok if r["method"] == "floor"), None)
    if floor is None:
        return
    for r in ok:
        if r is not floor:
            r["overhead_ms"] = statistics.median(a - b for a, b in zip(r["samples_ms"], floor["samples_ms"]))
            r["overhead"] = r["median_ms"] / floor["median_ms"]
    for ours in (r for r in ok if r["ours"]):
        peer = next((r for r in ok if r["method"] == ours["method"] and r["role"] == "peer"), None)
        if peer is None:
            continue
        speedup = _per_round([p / f for p, f in zip(peer["samples_ms"], ours["samples_ms"])])
        peer["fastpeft_speedup"], peer["speedup_iqr_pct"] = speedup["median"], speedup["iqr_pct"]
        peer["speedup_vs"] = ours["dtype"]
        ours["fastpeft_speedup"], ours["speedup_vs"] = 1.0, ours["dtype"]
        over = [(f - b) / (p - b) for f, p, b in zip(ours["samples_ms"], peer["samples_ms"], floor["samples_ms"])
                if p - b > 0]
        if over:
            ratio = _per_round(over)
            ours["overhead_vs_peer"], ours["overhead_vs_peer_iqr_pct"] = ratio["median"], ratio["iqr_pct"]


def run(level: str, dtypes: Optional[list] = None, method_names: Optional[list] = None, rounds: Optional[int] = None,
        progress=None, clock=time.perf_counter) -> list:
    """Every row of the training-step level (CPU only: a GPU run of this level is not built yet)."""
    rows = []
    for spec in model_specs(level):
        for dtype in dtypes or DTYPES:
            rows += run_model(spec, dtype, rounds or ROUNDS[level], method_names, progress, clock)
    return rows
