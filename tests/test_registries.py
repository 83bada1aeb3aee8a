"""Every list that must name every op or layer kind is complete.

The registries are derived (kernel modules from ``fastpeft.kernels``,
benchmark ops from ``benchmarks/ops``, PEFT-layer kinds from ``PeftLayer``
subclasses); these tests check that what they find is what exists, so an op
added without its kernel module, CPU module, benchmark or layer protocol fails
here.
"""
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import kernels
from fastpeft.nn.base import PEFT_LAYER_KINDS, PeftLayer

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ops import OP_MODULES  # noqa: E402
from op_registry import op_names  # noqa: E402


def test_the_known_ops_are_found():
    assert {"lora", "nf4", "qlora"} <= set(op_names())


def dispatched_functions(op: str) -> set[str]:
    """What ``fastpeft.ops.<op>`` calls on the module ``implementation(...)`` returns (``impl.<name>(``)."""
    source = inspect.getsource(importlib.import_module(f"fastpeft.ops.{op}"))
    return set(re.findall(r"\bimpl\.(\w+)\(", source))


@pytest.mark.parametrize("op", op_names())
def test_every_op_has_both_implementations_with_the_same_functions(op):
    """The dispatch contract: kernels.<op> and cpu.<op> have every function the op dispatches to."""
    cpu = importlib.import_module(f"fastpeft.cpu.{op}")
    triton_module = importlib.import_module(f"fastpeft.kernels.{op}")
    assert callable(triton_module.check_kernel_dtype)
    op_functions = dispatched_functions(op)
    assert op_functions, f"fastpeft.ops.{op} dispatches nothing through implementation()"
    for name in op_functions:
        assert callable(getattr(cpu, name, None)), f"fastpeft.cpu.{op} lacks {name}"
        assert callable(getattr(triton_module, name, None)), f"fastpeft.kernels.{op} lacks {name}"
        cpu_params = list(inspect.signature(getattr(cpu, name)).parameters)
        triton_signature = inspect.signature(getattr(triton_module, name)).parameters
        triton_params = list(triton_signature)
        # The Triton side may add trailing launch-config overrides (with defaults) for its own tests.
        extra = triton_params[len(cpu_params):]
        assert triton_params[:len(cpu_params)] == cpu_params, f"{name}: {cpu_params} != {triton_params}"
        assert all(triton_signature[e].default is not inspect.Parameter.empty for e in extra), (name, extra)


@pytest.mark.parametrize("op", op_names())
def test_every_op_is_benchmarked(op):
    assert op in OP_MODULES, f"no benchmarks/ops/{op}.py"


# Public kernel modules that are not an op's dispatch module but one of its launchers, by the op they serve.
KERNEL_MODULES_SERVING_AN_OP = {"nf4_gemv": "nf4"}


def test_every_kernel_module_is_an_op_or_serves_one():
    from gates.aot_spec import kernel_modules

    names = {m.rsplit(".", 1)[1] for m in kernel_modules()}
    assert names - set(KERNEL_MODULES_SERVING_AN_OP) == set(op_names())
    assert set(KERNEL_MODULES_SERVING_AN_OP.values()) <= set(op_names())
    assert set(KERNEL_MODULES_SERVING_AN_OP) <= names


def test_every_kernel_module_has_its_aot_launches():
    """A kernel module without its AOT module (``gates/aot/<op>.py``) would escape the static GPU gates."""
    from gates.aot_spec import aot_module, kernel_modules

    for module in kernel_modules():
        aot = aot_module(module)
        assert aot.__name__ != module and callable(getattr(aot, "aot_launches", None)), module
        assert aot.KERNEL_MODULE == module


def _peft_layer_classes():
    found = set()
    for info in pkgutil.iter_modules(fastpeft.nn.__path__):
        module = importlib.import_module(f"fastpeft.nn.{info.name}")
        found |= {v for v in vars(module).values() if inspect.isclass(v) and issubclass(v, PeftLayer)
                  and v is not PeftLayer and not v.__dict__.get("abstract_peft_layer", False)}
    return found


def test_every_peft_layer_class_is_registered_under_its_kind():
    classes = _peft_layer_classes()  # imports every module of fastpeft.nn first
    registered = {cls for classes in PEFT_LAYER_KINDS.values() for cls in classes}
    assert classes <= registered
    assert {fastpeft.nn.LoRALinear, fastpeft.nn.QLoRALinear} <= set(PEFT_LAYER_KINDS["lora"])


def test_every_module_with_trainable_adapter_parameters_is_a_peft_layer():
    """No nn.Module of fastpeft.nn holds lora_/adapter parameters outside the protocol."""
    for info in pkgutil.iter_modules(fastpeft.nn.__path__):
        module = importlib.import_module(f"fastpeft.nn.{info.name}")
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == module.__name__:
                if any(word in value.__name__.lower() for word in ("lora", "adapter", "prefix", "prompt")):
                    assert issubclass(value, PeftLayer), value
