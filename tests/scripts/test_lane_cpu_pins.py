"""Lint: no test in the GPU lane's selection pins the CPU where the lane runs CUDA.

The GPU lane makes CUDA the default device (tests/conftest.py); a test that
draws a dropout mask on ``"cpu"``, makes a CPU ``torch.Generator`` for tensors
of the default device, or compares a ``.cpu()`` copy with a tensor that stayed
on the device fails there for no fault of the kernels (issue 20 found 100-200
such false failures). Tests draw through ``tests/lane_device.py`` instead. The
selection is read from ``scripts/gpu_lane.sh`` (``TESTS=(...)``).
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPARISONS = {"equal", "allclose", "assert_close", "assert_close_to_ref"}


def lane_selection() -> list:
    script = (ROOT / "scripts" / "gpu_lane.sh").read_text()
    paths = re.search(r"^TESTS=\(([^)]*)\)", script, re.M).group(1).split()
    files = []
    for p in (ROOT / path for path in paths):
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return files


def _name(func) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _is_cpu(node) -> bool:
    if isinstance(node, ast.Constant) and node.value == "cpu":
        return True
    return (isinstance(node, ast.Call) and _name(node.func) == "device" and len(node.args) == 1
            and _is_cpu(node.args[0]))


def _has_cpu_copy(node) -> bool:
    return any(isinstance(n, ast.Call) and _name(n.func) == "cpu" and not n.args for n in ast.walk(node))


def cpu_pins(source: str) -> list:
    """``(line, what)`` of every CPU pin in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name, args = _name(node.func), list(node.args) + [k.value for k in node.keywords]
        if name.endswith("dropout_mask") and any(_is_cpu(a) for a in args):
            found.append((node.lineno, f"{name} drawn on the CPU"))
        elif name == "Generator" and (not args or any(_is_cpu(a) for a in args)):
            found.append((node.lineno, "a CPU torch.Generator"))
        elif name in COMPARISONS and len(node.args) >= 2 and len({_has_cpu_copy(a) for a in node.args[:2]}) == 2:
            found.append((node.lineno, f"{name} of a .cpu() copy and a tensor on the default device"))
    return sorted(found)


@pytest.mark.parametrize("path", lane_selection(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_cpu_pin_in_the_gpu_lane(path):
    pins = cpu_pins(path.read_text())
    assert not pins, "\n".join(f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in pins)


def test_the_lint_finds_each_kind_of_pin():
    source = '''
keep = tl_lora.dropout_mask((3, 4), 0.5, 7, "cpu")
keep = lora_dropout_mask((3, 4), 0.5, 7, device=torch.device("cpu"))
gen = torch.Generator().manual_seed(0)
assert torch.equal(out.cpu(), ref)
ok = tl_lora.dropout_mask((3, 4), 0.5, 7, lane_device())
ok = torch.equal(out.cpu(), ref.cpu())
'''
    assert [line for line, _ in cpu_pins(source)] == [2, 3, 4, 5]
    assert len(lane_selection()) > 10
