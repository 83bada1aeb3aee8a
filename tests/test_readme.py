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


def _headline_tables(markdown: str) -> list[str]:
    """The markdown table right after each 'Headline' heading, as text blocks, in order."""
    tables = []
    for section in re.split(r"^#+ Headline", markdown, flags=re.M)[1:]:
        lines = section.splitlines()[1:]
        start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
        tables.append("\n".join(lines[start:end]))
    return tables


def test_readme_benchmark_figures_come_from_the_committed_results():
    """Each benchmark block of the README (kernel ops; the training-step level) holds the headline tables
    and the command of the committed result set it names, exactly as in that set's summary.md."""
    readme = README.read_text()
    blocks = re.findall(r"<!-- benchmark-results:(\S+):start -->(.*?)<!-- benchmark-results:\S+:end -->", readme,
                        flags=re.S)
    named = [(key, block) for key, block in blocks if "Committed " in block]
    assert any(key == "cpu" for key, _ in named), "README must name the result set its benchmark table comes from"
    for key, block in named:
        source = re.search(r"Committed CPU (?:[\w-]+ )?result set \(`(benchmarks/results/[^`]+)/`\)", block)
        assert source, f"the {key} block must name its result set"
        summary = (README.parent / source.group(1) / "summary.md").read_text()
        readme_tables = _headline_tables(block)
        assert readme_tables and all(readme_tables), f"the {key} block has no headline tables"
        assert readme_tables == _headline_tables(summary), (
            f"README {key} headline tables differ from {source.group(1)}/summary.md: "
            f"rewrite them with python -m benchmarks --out {source.group(1)} --update-readme")
        command = re.search(r"^Command: `(python -m benchmarks[^`]*)`", summary, flags=re.M).group(0)
        assert command in block
