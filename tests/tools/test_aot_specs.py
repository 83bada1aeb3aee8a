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
import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent('''
    import json, sys, torch
    from fastpeft.kernels import lora, nf4, qlora
    from fastpeft.kernels.aot_spec import all_spec_keys, kernel_modules, module_specs, recording, spec_of_launch

    def lora_calls(dtype, m, r, k, n):
        x, w, b = torch.empty(m, k, dtype=dtype), torch.empty(n, k, dtype=dtype), torch.empty(n, dtype=dtype)
        a, bb, dy = torch.empty(r, k, dtype=dtype), torch.empty(n, r, dtype=dtype), torch.empty(m, n, dtype=dtype)
        h = torch.empty(m, r)
        for p in (0.0, 0.1):
            lora.lora_forward(x, w, b, a, bb, 2.0, p, 3)
            lora.lora_backward(dy, x, w, a, bb, h, 2.0, p, 3, True, True, True)
        return (x, dy, a, bb)

    def nf4_calls(dtype, m, r, k, n):
        weight = nf4.aot_weight(n, k, 64)
        x, dy, a, bb = lora_calls(dtype, m, r, k, n)
        nf4.nf4_forward(x, *weight, n, k, 64, torch.empty(n, dtype=dtype))
        nf4.nf4_input_grad(dy, *weight, n, k, 64)
        h = torch.empty(m, r)
        for p in (0.0, 0.1):
            qlora.qlora_forward(x, *weight, n, k, 64, None, a, bb, 2.0, p, 3)
            qlora.qlora_backward(dy, x, *weight, n, k, 64, a, bb, h, 2.0, p, 3, True, True, True)

    launches = []
    with recording() as launches:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for m in (1, 5, 16, 17, 48, 64, 65, 300, 1024, 3000):
                for r in (4, 8, 16, 32, 128):
                    nf4_calls(dtype, m, r, 256, 192)
        lora.dropout_mask((33, 64), 0.5, 7, "cpu")
    keys = all_spec_keys()
    names = {spec.key(): spec.name for module in kernel_modules() for spec in module_specs(module)}
    missing = sorted({spec_of_launch(l).fn.__name__ + " " + l.label + str(sorted(spec_of_launch(l).constexprs.items()))
                      for l in launches if spec_of_launch(l).key() not in keys})
    kernels = sorted({l.fn.__name__ for l in launches})
    json.dump({"launches": len(launches), "kernels": kernels, "missing": missing,
               "duplicate_names": len(names) - len(set(names.values()))}, sys.stdout)
''')


@pytest.fixture(scope="module")
def coverage():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_launch_has_a_spec(coverage):
    assert coverage["launches"] > 1000
    assert not coverage["missing"], f"{len(coverage['missing'])} launch variants without a spec: {coverage['missing'][:3]}"


def test_every_kernel_was_launched(coverage):
    assert coverage["kernels"] == sorted(["_dropout_keep_kernel", "_lora_fused_gemm_kernel", "_lora_reduce_kernel",
                                          "_lora_shrink_kernel", "_nf4_gemv_kernel", "_nf4_matmul_kernel",
                                          "_nf4_matmul_t_kernel"])


def test_spec_names_are_unique(coverage):
    assert coverage["duplicate_names"] == 0
