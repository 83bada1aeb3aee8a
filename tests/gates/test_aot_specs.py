"""The kernel report compiles what runs: every launch the launchers make has an AOT spec.

For each kernel module, realistic calls (contiguous tensors, feature sizes that
are multiples of 16, PEFT's usual ranks, token counts in every size class)
are recorded in a child process without the interpreter (where ``@triton.jit``
gives the JITFunctions whose binder decides Triton's specialisation), and
each launch's variant must be among the specs of ``aot_spec.kernel_modules()``.
A spec that diverges from the launches (another stride specialisation, a
missing divisibility hint, another config) fails here.
"""
import json
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent('''
    import json, sys, torch
    from fastpeft.kernels import adapter, lora, nf4, nf4_gemv, prefix_attention, qlora
    from gates.aot.nf4 import aot_weight
    from gates.aot_spec import all_spec_keys, kernel_modules, module_specs, recording, spec_of_launch

    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    TOKENS = (1, 5, 16, 17, 48, 64, 65, 300, 1024, 3000)

    def lora_calls():
        k, n = 256, 192
        for dtype in DTYPES:
            for m in TOKENS:
                for r in (4, 8, 16, 32, 128):
                    x, w, b = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype), torch.empty(n, dtype=dtype)
                    a, bb = torch.empty(r, k, dtype=dtype), torch.empty(n, r, dtype=dtype)
                    dy, h = torch.empty(m, n, dtype=dtype), torch.empty(m, r, dtype=dtype)
                    for p in (0.0, 0.1):
                        lora.lora_forward(x, w, b, a, bb, 2.0, p, 3)
                        lora.lora_backward(dy, x, w, a, bb, h, 2.0, p, 3, True, True, True)
        lora.dropout_mask((33, 64), 0.5, 7, "cpu")

    def nf4_calls():
        k, n = 256, 192
        weight = aot_weight(n, k, 64)
        for dtype in DTYPES:
            for m in TOKENS:
                x, dy = torch.empty(m, k, dtype=dtype), torch.empty(m, n, dtype=dtype)
                nf4.nf4_forward(x, *weight, n, k, 64, torch.empty(n, dtype=dtype))
                nf4.nf4_input_grad(dy, *weight, n, k, 64)
            nf4.nf4_dequantize(*weight, n, k, 64, dtype)

    def nf4_gemv_calls():
        for k, n, bs in ((256, 192, 64), (1024, 96, 128), (4096, 64, 64)):
            weight = aot_weight(n, k, bs)
            for dtype in DTYPES:
                for m in (1, 2, 3, 7, 16):
                    x, bias = torch.empty(m, k, dtype=dtype), torch.empty(n, dtype=dtype)
                    nf4_gemv.nf4_gemv(x, *weight, n, k, bs)
                    for r in (8, 20):
                        h, b = torch.empty(m, r, dtype=dtype), torch.empty(n, r, dtype=dtype)
                        nf4_gemv.nf4_gemv(x, *weight, n, k, bs, bias=bias, lora_h=h, lora_B=b, lora_scale=2.0)

    def qlora_calls():
        k, n = 256, 192
        weight = aot_weight(n, k, 64)
        for dtype in DTYPES:
            for m in TOKENS:
                for r in (4, 8, 16, 32, 128):
                    x, dy = torch.empty(m, k, dtype=dtype), torch.empty(m, n, dtype=dtype)
                    a, bb, h = torch.empty(r, k, dtype=dtype), torch.empty(n, r, dtype=dtype), torch.empty(m, r, dtype=dtype)
                    for p in (0.0, 0.1):
                        qlora.qlora_forward(x, *weight, n, k, 64, None, a, bb, 2.0, p, 3)
                        qlora.qlora_backward(dy, x, *weight, n, k, 64, a, bb, h, 2.0, p, 3, True, True, True)

    def adapter_calls():
        for dtype in DTYPES:
            for hidden, b in ((768, 48), (4096, 256)):
                e = lambda *shape: torch.empty(shape, dtype=dtype)
                for m in (1, 7, 512, 4096):
                    x, dy = e(m, hidden), e(m, hidden)
                    dw, uw, db, ub = e(b, hidden), e(hidden, b), e(b), e(hidden)
                    adapter.adapter_forward(x, dw, uw, db, ub, x, 1.0, None, "relu", 0.0, 0, False)
                    _, pre = adapter.adapter_forward(x, dw, uw, db, ub, x, 1.0, e(hidden), "relu", 0.1, 1, True)
                    adapter.adapter_backward(dy, x, dw, uw, ub, pre, 1.0, e(), "relu", 0.1, 1, *[True] * 6)

    def prefix_attention_calls():
        for dtype in DTYPES:
            for d in (64, 128):
                for bsz, s, p in ((1, 1, 10), (2, 128, 32), (2, 100, 10)):
                    hq, hkv = 8, 2
                    # HF's [B, S, H, D] layout viewed as [B, H, S, D]
                    q = torch.empty(bsz, s, hq, d, dtype=dtype).transpose(1, 2)
                    k = torch.empty(bsz, s, hkv, d, dtype=dtype).transpose(1, 2)
                    v = torch.empty(bsz, s, hkv, d, dtype=dtype).transpose(1, 2)
                    pk, pv = torch.empty(1, hkv, p, d, dtype=dtype), torch.empty(1, hkv, p, d, dtype=dtype)
                    for causal in (False, True):
                        out, lse = prefix_attention.prefix_attention_forward(q, k, v, pk, pv, None, causal, None)
                        prefix_attention.prefix_attention_backward(torch.empty_like(out), q, k, v, pk, pv, None,
                                                                   out, lse, causal, None, True, True, True)

    def dora_calls():
        from fastpeft.kernels import dora
        for dtype in DTYPES:
            for m in TOKENS:
                for n in (192, 4096):
                    dy, z, v = torch.empty(m, n, dtype=dtype), torch.empty(m, n, dtype=dtype), torch.empty(n)
                    for has_z, write_g in ((True, True), (False, True), (True, False)):
                        dora.dora_grad_scale(dy, z if has_z else None, v, v, write_g)

    MODULE_CALLS = {"fastpeft.kernels.lora": lora_calls, "fastpeft.kernels.nf4": nf4_calls,
                    "fastpeft.kernels.nf4_gemv": nf4_gemv_calls, "fastpeft.kernels.dora": dora_calls,
                    "fastpeft.kernels.qlora": qlora_calls, "fastpeft.kernels.adapter": adapter_calls,
                    "fastpeft.kernels.prefix_attention": prefix_attention_calls}
    keys = all_spec_keys()
    names = {spec.key(): spec.name for module in kernel_modules() for spec in module_specs(module)}
    report = {"modules": sorted(MODULE_CALLS), "kernel_modules": sorted(kernel_modules()),
              "duplicate_names": len(names) - len(set(names.values())), "per_module": {}}
    for module, calls in MODULE_CALLS.items():
        with recording() as launches:
            calls()
        specs = [spec_of_launch(l) for l in launches]
        missing = sorted({s.fn.__name__ + str(sorted((k, str(v)) for k, v in s.constexprs.items()))
                          for s in specs if s.key() not in keys})
        report["per_module"][module] = {"launches": len(launches), "kernels": sorted({s.fn.__name__ for s in specs}),
                                        "missing": missing}
    json.dump(report, sys.stdout)
''')



@pytest.fixture(scope="module")
def coverage():
    from gates.aot_spec import uninterpreted_environment

    done = subprocess.run([sys.executable, "-c", _CHILD], env=uninterpreted_environment(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_kernel_module_is_exercised(coverage):
    assert coverage["modules"] == coverage["kernel_modules"]


@pytest.mark.parametrize("module", ["lora", "nf4", "nf4_gemv", "qlora", "adapter", "prefix_attention", "dora"])
def test_every_launch_has_a_spec(coverage, module):
    result = coverage["per_module"][f"fastpeft.kernels.{module}"]
    assert result["launches"] > 10
    assert not result["missing"], f"{len(result['missing'])} launch variants without a spec: {result['missing'][:2]}"


def test_every_lora_and_nf4_kernel_was_launched(coverage):
    kernels = {k for m in ("lora", "nf4") for k in coverage["per_module"][f"fastpeft.kernels.{m}"]["kernels"]}
    assert kernels == {"_dropout_keep_kernel", "_lora_fused_gemm_kernel", "_lora_reduce_kernel", "_lora_shrink_kernel",
                       "_lora_split_sum_kernel", "_nf4_dequant_kernel", "_nf4_decode_gemv_kernel", "_nf4_matmul_kernel",
                       "_nf4_matmul_t_kernel"}


def test_spec_names_are_unique(coverage):
    assert coverage["duplicate_names"] == 0
