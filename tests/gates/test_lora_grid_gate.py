"""The grid gate's inputs for LoRA, without compiling: recorded grids and the headline launches.

``gates.aot_spec`` records each launch's grid and which launches
are at a benchmark headline shape (``launch_label(..., headline=True)``); the
kernel report (``gates.kernel_report``) then fails a variant whose
headline grid has fewer CTAs than the GPU has SMs. Here: the grids the
recorder keeps are the ones the launchers compute (hand-computed for known
shapes), LoRA's headline shapes are the benchmark's GPU shapes, and every one
of their launches fills an H100 (132 SMs), so the compiled report cannot fail
on them. Recording needs a process without ``TRITON_INTERPRET=1``.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from gates.aot_spec import uninterpreted_environment

NO_INTERPRETER = uninterpreted_environment()

_CHILD = textwrap.dedent('''
    import json, sys, torch
    from fastpeft.kernels import lora
    from gates.aot import lora as lora_aot
    from gates.aot_spec import launch_label, record_specs

    def known_shapes():
        bf16 = torch.bfloat16
        x, w, b = torch.empty(1, 4096, dtype=bf16), torch.empty(4096, 4096, dtype=bf16), torch.empty(4096, dtype=bf16)
        a, bb = torch.empty(16, 4096, dtype=bf16), torch.empty(4096, 16, dtype=bf16)
        with launch_label("m1", True, headline=True):
            lora.lora_forward(x, w, b, a, bb, 2.0, 0.0, 0)
        x = torch.empty(4096, 4096, dtype=bf16)
        with launch_label("m4096", True):
            lora.lora_forward(x, w, b, a, bb, 2.0, 0.0, 0)
        with launch_label("m4096", True, headline=True):  # the same variant again: its grid joins the headline list
            lora.lora_forward(x, w, b, a, bb, 2.0, 0.0, 0)

    specs = record_specs(known_shapes)
    lora_specs = lora_aot.aot_specs()
    print(json.dumps({
        "known": [[s.name, list(s.grid), [list(h) for h in s.headline_grids]] for s in specs],
        "headline": [[s.name, label, ctas] for s in lora_specs for label, ctas in s.headline_grids],
        "labels": sorted({label for s in lora_specs for label, _ in s.headline_grids}),
        "grids_recorded": all(s.grid for s in lora_specs),
    }))
''')


@pytest.fixture(scope="module")
def recorded():
    done = subprocess.run([sys.executable, "-c", _CHILD], env=NO_INTERPRETER, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_recorded_grid_is_the_launchers_grid(recorded):
    known = {name: (tuple(grid), [tuple(h) for h in headline]) for name, grid, headline in recorded["known"]}
    # M = 1, K = N = 4096, r = 16, bf16. Shrink: 16-row tile, K in 16-wide steps: 256 steps, one per split
    # (256 // 132 = 1), so grid (1 row tile, 1 rank tile, 256 splits); its partials take one summing launch
    # of [1, 16] (one program). Fused GEMM: 16x64 tiles are only 64 programs, the 16x16 tile 256.
    assert known["lora_shrink[m1]"] == ((1, 1, 256), [("m1", 256)])
    assert known["lora_split_sum[m1]"] == ((1,), [])  # an epilogue: never a headline launch
    assert known["lora_fused_gemm[m1]"] == ((256,), [("m1", 256)])
    # M = 4096: 64-row tiles are 64 programs, 16-row tiles 256 (no split); GEMM 128x128 tiles: 32 x 32.
    assert known["lora_shrink[m4096]"] == ((256, 1, 1), [("m4096", 256)])
    assert known["lora_fused_gemm[m4096]"] == ((1024,), [("m4096", 1024)])
    assert len(known) == 5


def test_every_lora_variant_records_its_grid(recorded):
    assert recorded["grids_recorded"]


def test_headline_shapes_are_the_benchmark_gpu_shapes(recorded):
    from benchmarks.ops.lora import _shapes
    from gates.aot import lora

    bench = {(s["tokens"], s["K"], s["N"], s["r"]) for s in _shapes("cuda", "full")}
    ours = {(m, k, n, r) for r in lora.HEADLINE_RANKS for k, n in lora.HEADLINE_FEATURES for m in lora.HEADLINE_TOKENS}
    assert ours == bench
    labels = set(recorded["labels"])
    for dtype in ("fp32", "fp16", "bf16"):
        for m, k, n, r in bench:
            for direction in ("fwd", "bwd"):
                assert f"{dtype},r{r},m{m},k{k},n{n},{direction}" in labels


def test_every_headline_launch_fills_an_h100(recorded):
    """What the report's grid gate checks per arch (108 SMs on sm_80, 132 on sm_90), without compiling."""
    from gates.kernel_report import SM_COUNT

    assert recorded["headline"]
    kernels = {name.split("[")[0] for name, _, _ in recorded["headline"]}
    assert kernels == {"lora_shrink", "lora_fused_gemm", "lora_reduce"}
    small = [(name, label, ctas) for name, label, ctas in recorded["headline"] if ctas < max(SM_COUNT.values())]
    assert not small, small[:5]
