"""The package's layers, checked from the imports its source files make (``docs/architecture.md``, section 1).

Every ``import`` / ``from ... import`` in ``fastpeft/`` (module level or inside
a function; relative imports resolved) is read from the syntax tree, so a new
upward import fails here without anyone listing it. Floors, lowest first:
the ground floor (``_backend``, ``_validation``, ``activations``, ``quant``,
...), the two sibling implementation floors ``kernels`` (Triton) and ``cpu``
(neither imports the other), ``ops``, ``variants``, ``nn``, ``injection``,
``integrations`` and the package's ``__init__``. A module imports only its own
floor or lower ones. The development packages beside the wheel (``gates``,
``benchmarks``, ``tests``) are never imported from ``fastpeft``.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastpeft"

GROUND = 0
FLOORS = {
    "_backend": GROUND, "_validation": GROUND, "_native": GROUND, "_peft_task_type": GROUND,
    "activations": GROUND, "quant": GROUND,
    "kernels": 1, "cpu": 1,
    "ops": 2,
    "variants": 3,
    "nn": 4,
    "injection": 5,
    "integrations": 6,
    "optimizers": 6,  # LoRA+ / LoRA-FA optimizer helpers: read the injected LoRA layers
    "": 7,  # fastpeft/__init__.py: the public API
}
SIBLINGS = {"kernels", "cpu"}  # one floor, two implementations of it: never each other
DEVELOPMENT_PACKAGES = {"gates", "benchmarks", "tests"}


def _module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports_of(module: str, is_package: bool, source: str) -> set[str]:
    """The absolute names ``module`` imports (``from a import b`` gives ``a.b``: b may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            found |= {f"{origin}.{alias.name}" for alias in node.names}
    return found


def floor_of(module: str) -> str:
    """``fastpeft.ops.lora`` -> ``ops``; ``fastpeft`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(module: str, is_package: bool, source: str) -> list[str]:
    """Each import of ``module`` that goes up a floor, across the sibling floors, or into a development package."""
    own = floor_of(module)
    if own not in FLOORS:
        return [f"{module}: declare the floor of fastpeft/{own} in FLOORS (tests/test_layers.py)"]
    out = []
    for target in sorted(imports_of(module, is_package, source)):
        top = target.split(".")[0]
        if top in DEVELOPMENT_PACKAGES:
            out.append(f"{module} imports {target}: {top}/ is not part of the wheel")
        if top != "fastpeft":
            continue
        other = floor_of(target)
        if other not in FLOORS:  # ``from fastpeft import x``: x is something the package exports
            other = ""
        if FLOORS[other] > FLOORS[own]:
            out.append(f"{module} imports {target}: an upward import")
        elif own in SIBLINGS and other in SIBLINGS and own != other:
            out.append(f"{module} imports {target}: kernels/ and cpu/ are sibling floors")
    return out


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_go_down_the_floors(path):
    assert layer_violations(*_module_name(path), path.read_text()) == []


@pytest.mark.parametrize("module, source", [
    ("fastpeft.kernels.probe", "def f():\n    from ..ops import lora_linear\n"),  # upward, inside a function
    ("fastpeft.kernels.probe", "from ..cpu.lora import dropout_mask\n"),  # across the siblings
    ("fastpeft.cpu.probe", "import fastpeft.kernels.lora\n"),
    ("fastpeft.ops.probe", "from ..nn import LoRALinear\n"),
    ("fastpeft.quant.probe", "from .. import injection\n"),
    ("fastpeft.nn.probe", "from gates.aot_spec import kernel_modules\n"),
    ("fastpeft.integrations.probe", "import benchmarks.ops\n"),
])
def test_the_check_finds_each_kind_of_bad_import(module, source):
    assert len(layer_violations(module, False, source)) == 1


def test_the_check_passes_downward_imports():
    assert layer_violations("fastpeft.ops.probe", False, "from ..kernels import lora\nfrom ..cpu import lora\n"
                            "from .._backend import select_backend\nimport torch\n") == []
