"""Every list that must name every op or layer kind is complete.

The registries are derived (kernel modules from ``fastpeft.kernels``,
benchmark ops from ``benchmarks/ops``, PEFT-layer kinds from ``PeftLayer``
subclasses); these tests check that what they find is what exists, so an op
added without its declared contract (``fastpeft/ops/_contracts.py``), kernel
module, CPU module, AOT launches, benchmark or layer protocol fails here.
"""
import ast
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import kernels
from fastpeft.nn.base import PEFT_LAYER_KINDS, PeftLayer
from fastpeft.ops._contracts import CONTRACTS, contract_functions

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.ops import OP_MODULES  # noqa: E402
from op_registry import op_names  # noqa: E402


def test_the_known_ops_are_found():
    assert {"lora", "nf4", "qlora"} <= set(op_names())


def calls_on_the_implementation(op: str) -> set[str]:
    """The functions ``fastpeft.ops.<op>`` calls on a name bound to ``implementation(...)`` (from its syntax tree)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(f"fastpeft.ops.{op}")))
    bound = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "implementation"
             for target in node.targets if isinstance(target, ast.Name)}
    return {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id in bound}


def test_every_op_has_a_declared_contract():
    assert set(CONTRACTS) == set(op_names()), "each op declares its contract in fastpeft/ops/_contracts.py"


@pytest.mark.parametrize("op", op_names())
def test_both_implementations_satisfy_the_contract(op):
    """kernels.<op> and cpu.<op> define every function of the op's protocol with its parameters; the Triton side
    may add trailing launch-config overrides (with defaults) for its own tests."""
    contract = contract_functions(op)
    assert contract, f"{op}: an empty contract"
    for module in (f"fastpeft.cpu.{op}", f"fastpeft.kernels.{op}"):
        implementation = importlib.import_module(module)
        for name, declared in contract.items():
            function = getattr(implementation, name, None)
            assert callable(function), f"{module} lacks {name}"
            params = list(inspect.signature(function).parameters.values())
            names, declared_names = [p.name for p in params], list(declared.parameters)
            assert names[:len(declared_names)] == declared_names, f"{module}.{name}: {names} != {declared_names}"
            assert all(p.default is not inspect.Parameter.empty for p in params[len(declared_names):]), (module, name)
    assert callable(importlib.import_module(f"fastpeft.kernels.{op}").check_kernel_dtype)


@pytest.mark.parametrize("op", op_names())
def test_every_op_calls_only_its_contract_on_the_implementation(op):
    called = calls_on_the_implementation(op)
    assert called, f"fastpeft.ops.{op} dispatches nothing through implementation()"
    assert called <= set(contract_functions(op)), f"fastpeft.ops.{op} calls {called - set(contract_functions(op))}"


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
