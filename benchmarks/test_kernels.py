"""Every (op, shape, mode, provider) of the suite as a pytest-benchmark test.

Same cases and steps as ``python -m benchmarks`` (``runner.make_steps``): the
untimed ``prepare`` (clear grads, the forward of a backward-only measurement)
runs as pytest-benchmark's per-round setup, the timed step as its target.
A provider that cannot be imported here is skipped with the reason.
"""
import itertools

import pytest
import torch

from benchmarks.suite.machine import choose_device, default_dtype
from benchmarks.ops import load_ops
from benchmarks.suite.runner import dtypes_for, make_steps, shapes_for

ROUNDS = {"quick": 5, "default": 20, "full": 50}


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = choose_device(config.getoption("--bench-device"))
    level = config.getoption("--bench-level")
    cases, ids = [], []
    for op in load_ops(config.getoption("--bench-op")):
        for dtype in dtypes_for(op, device.type, level, default_dtype(device)):
            for shape in shapes_for(op, device.type, level):
                for mode in op.modes:
                    for provider in op.providers:
                        cases.append((op, shape, mode, provider, device, level, dtype))
                        ids.append(f"{op.name}-{str(dtype).replace('torch.', '')}-{mode}-{provider.name}-"
                                   f"{op.shape_label(shape).replace(' ', ',')}")
    metafunc.parametrize("bench_case", cases, ids=ids)


def test_kernel(benchmark, bench_case):
    op, shape, mode, provider, device, level, dtype = bench_case
    reason = provider.unavailable()
    if reason is not None:
        pytest.skip(reason)
    case = op.make_case(shape, device, dtype, mode)
    built = provider.build(case)
    prepare, step = make_steps(built, case)
    rounds = itertools.count()

    def setup():
        i = next(rounds)
        prepare(i)
        return (i,), {}

    def target(i):
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"{op.name} {mode} {dtype} {op.shape_label(shape)}"
    benchmark.extra_info.update(op=op.name, mode=mode, provider=provider.name, dtype=str(dtype), **shape)
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS[level], warmup_rounds=1)
