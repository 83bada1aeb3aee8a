"""Every ```python block of README.md runs, in order, in one namespace: docs that cannot rot."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("backend", ["cpu"])
def test_readme_python_blocks_run(backend, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    monkeypatch.chdir(tmp_path)  # examples that save files write into a scratch folder
    namespace = {"__name__": "__readme__"}
    for number, code in enumerate(BLOCKS, 1):
        exec(compile(code, f"README.md python block {number}", "exec"), namespace)
