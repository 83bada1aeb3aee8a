"""One prefix-tuning training step of a Llama-style model: fastpeft vs HF PEFT.

    python -m benchmarks.standalone.prefix_tuning_step [--device cpu|cuda] [--dtypes float32,bfloat16] [--batch 2] [--seq 512]
                                            [--prefix 20] [--reps 7] [--out results.json]

The model is built from a config (no download): 4 layers, hidden 512, 8 query
heads / 4 KV heads (GQA), MLP 1376, vocabulary 4096, random weights, in the
measured dtype; batch x seq tokens with the last quarter of the first row
padded. A step is ``zero_grad`` + forward with labels (causal-LM loss) +
backward + ``AdamW.step`` on the prefix parameters (plain prefix, P tokens).
Every variant gets PEFT's random prefix, so their first losses (``loss``
column, before any step) agree: they compute the same thing.

Variants, built once and timed interleaved (each repetition runs every variant
once, in a rotating order, so load drifts hit all of them alike):
- ``fastpeft``: ``apply_prefix_tuning``;
- ``peft``: ``get_peft_model(PrefixTuningConfig)``;
- ``fastpeft+ckpt``: fastpeft after ``model.gradient_checkpointing_enable()``;
- ``peft+ckpt``: not runnable, PEFT raises; the table shows its error.

Reported per variant: median step time (and quartiles), ``peft/variant`` (PEFT's
step time over the variant's: above 1, the variant is faster, as the suite's
``peer/fastpeft``), and memory: ``saved MB`` is what autograd keeps between forward and
backward (``benchmarks/suite/memory.py``; gradient checkpointing's recompute inputs
are not autograd-saved tensors, so it is a lower bound there); on CPU ``peak
MB`` is the process's resident-set peak during one step above its size before
the step (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), on CUDA
``torch.cuda.max_memory_allocated`` above the memory allocated before.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..suite.harness import summarize
from ..suite.machine import choose_device, metadata
from ..suite.memory import cuda_peak_bytes, saved_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the suite's names
MB = 2 ** 20


def llama_config(vocab: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, pad_token_id=0)


def build_model(dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).to(device=device, dtype=dtype).train()


def make_batch(batch: int, seq: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, llama_config().vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - seq // 4:] = 0  # right padding on one row
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


@dataclass
class Variant:
    name: str
    model: Optional[torch.nn.Module] = None
    params: list = field(default_factory=list)
    error: Optional[str] = None
    samples: list = field(default_factory=list)
    saved_mb: Optional[float] = None
    peak_mb: Optional[float] = None
    first_loss: Optional[float] = None

    def step_fn(self, ids, mask, labels) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(self.params, lr=1e-3)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
        return step


def build_variants(dtype: torch.dtype, device: torch.device, prefix: int) -> list:
    from peft import PrefixTuningConfig, get_peft_model

    from fastpeft.injection.prefix_tuning import apply_prefix_tuning
    from fastpeft.injection.prompt_learning import prompt_parameters

    variants = []
    peft_model = get_peft_model(build_model(dtype, device), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=prefix))
    prefix_state = peft_model.prompt_encoder["default"].state_dict()
    ours = apply_prefix_tuning(build_model(dtype, device), prefix)
    ours.fastpeft_prompt.load_state_dict(prefix_state)  # same prefix: the two compute the same loss
    variants.append(Variant("fastpeft", ours, prompt_parameters(ours)))
    variants.append(Variant("peft", peft_model, [p for p in peft_model.parameters() if p.requires_grad]))
    ours_ckpt = build_model(dtype, device)
    ours_ckpt.gradient_checkpointing_enable()
    apply_prefix_tuning(ours_ckpt, prefix)
    ours_ckpt.fastpeft_prompt.load_state_dict(prefix_state)
    variants.append(Variant("fastpeft+ckpt", ours_ckpt, prompt_parameters(ours_ckpt)))
    peft_ckpt = build_model(dtype, device)
    peft_ckpt.gradient_checkpointing_enable()
    try:
        get_peft_model(peft_ckpt, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix))
        raise RuntimeError("PEFT accepted prefix tuning with gradient checkpointing: measure it")
    except ValueError as err:
        variants.append(Variant("peft+ckpt", error=f"{type(err).__name__}: {err}"))
    return variants


def _rss_peak_mb(step: Callable[[], None]) -> Optional[float]:
    """Peak resident set during ``step()`` above the resident set before it (Linux), in MB."""
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = status("VmRSS:")
        step()
        return (status("VmHWM:") - before) / MB
    except OSError:
        return None


def measure_memory(variant: Variant, step: Callable[[], None], ids, mask, labels, device: torch.device) -> None:
    existing = [p for p in variant.model.parameters()] + [ids, mask, labels]

    def forward_only():
        return variant.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    variant.saved_mb = saved_bytes(forward_only, existing) / MB
    if device.type == "cuda":
        peak = cuda_peak_bytes(step, device)
        variant.peak_mb = None if peak is None else peak / MB
    else:
        variant.peak_mb = _rss_peak_mb(step)


def run(dtype_name: str, device: torch.device, batch: int, seq: int, prefix: int, reps: int) -> list:
    dtype = DTYPES[dtype_name]
    ids, mask, labels = make_batch(batch, seq, device)
    variants = build_variants(dtype, device, prefix)
    runnable = [v for v in variants if v.error is None]
    steps = {}
    for v in runnable:
        with torch.no_grad():
            v.first_loss = v.model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        step = v.step_fn(ids, mask, labels)
        steps[v.name] = step
        step()  # warm-up (allocations, optimizer state)
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rep in range(reps):
        order = runnable[rep % len(runnable):] + runnable[:rep % len(runnable)]
        for v in order:
            sync()
            t0 = time.perf_counter()
            steps[v.name]()
            sync()
            v.samples.append(time.perf_counter() - t0)
    for v in runnable:
        measure_memory(v, steps[v.name], ids, mask, labels, device)
    peft_median = next(summarize(v.samples).median_s for v in runnable if v.name == "peft")
    rows = []
    for v in variants:
        row = {"dtype": dtype_name, "variant": v.name, "batch": batch, "seq": seq, "prefix": prefix}
        if v.error is not None:
            row["error"] = v.error
        else:
            t = summarize(v.samples)
            row.update(median_ms=t.median_s * 1e3, q25_ms=t.q25_s * 1e3, q75_ms=t.q75_s * 1e3, reps=t.reps,
                       peft_speedup=peft_median / t.median_s, saved_mb=v.saved_mb, peak_mb=v.peak_mb,
                       first_loss=v.first_loss)
        rows.append(row)
    del variants, runnable, steps
    gc.collect()
    return rows


def render(rows: list) -> str:
    header = ["dtype", "variant", "median ms", "q25-q75 ms", "peft/variant", "saved MB", "peak MB", "loss"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["dtype"], r["variant"], "-", "-", "-", "-", "-", r["error"]])
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
        body.append([r["dtype"], r["variant"], f"{r['median_ms']:.1f}", f"{r['q25_ms']:.1f}-{r['q75_ms']:.1f}",
                     f"{r['peft_speedup']:.2f}x", fmt(r["saved_mb"]), fmt(r["peak_mb"]), f"{r['first_loss']:.5f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated model dtypes: float32, bfloat16, float16 (default: float32,bfloat16)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--prefix", type=int, default=20, help="virtual tokens P (default 20)")
    parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions per variant")
    parser.add_argument("--out", default=None, help="write rows and machine metadata as JSON")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    meta = metadata(device, dtype_names, " ".join(["python -m benchmarks.standalone.prefix_tuning_step", *sys.argv[1:]]))
    rows = []
    for name in dtype_names:
        rows += run(name, device, args.batch, args.seq, args.prefix, args.reps)
    meta["load_avg_after"] = metadata(device, dtype_names, "")["load_avg_before"]
    print(f"Prefix tuning training step, Llama-style 4x512 (GQA 8/4), {args.batch}x{args.seq} tokens, "
          f"P={args.prefix}, {meta['device_name']}, torch threads {meta['torch_threads']}, "
          f"load {meta['load_avg_before']} -> {meta['load_avg_after']}")
    print(render(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
