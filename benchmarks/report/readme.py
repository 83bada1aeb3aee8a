"""``--update-readme``: the README's benchmark block, rewritten from one run's results.

The repository README holds, per device type, a block between the markers
``<!-- benchmark-results:cpu:start -->`` and ``<!-- benchmark-results:cpu:end -->``
(``cuda`` for a GPU set): the result set's folder, machine, command, ceilings
and headline tables, exactly as in that folder's summary.md
(``tests/test_readme.py`` checks they match). Nothing else in the README is
touched, and nothing is written unless the run asks for it; the result folder
must be a committed set (``--out benchmarks/results/<tag>``), not a
timestamped folder that git ignores.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from ..suite.machine import REPO_ROOT
from .outputs import ceilings_line, machine_line

README = REPO_ROOT / "README.md"
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"


def markers(device_type: str) -> tuple:
    return f"<!-- benchmark-results:{device_type}:start -->", f"<!-- benchmark-results:{device_type}:end -->"


def train_step_key(device_type: str) -> str:
    """The README block of the training-step level (its own result set, beside the kernel ops' block)."""
    return f"{device_type}-train-step"


def check_target(out_dir: Path, device_type: str, readme: Path = None, results_root: Path = None) -> str:
    """``out_dir`` as the README names it (``benchmarks/results/<tag>``); exits with the reason when the README
    cannot name it: not a folder of benchmarks/results, ignored by git, or no block to rewrite in the README."""
    readme = readme or README
    results_root = Path(results_root or RESULTS_ROOT).resolve()
    out_dir = Path(out_dir).resolve()
    try:
        relative = out_dir.relative_to(results_root)
    except ValueError:
        raise SystemExit(f"--update-readme: the README can only name a committed result set; "
                         f"add --out benchmarks/results/<tag> (got {out_dir})") from None
    if len(relative.parts) != 1:
        raise SystemExit(f"--update-readme: --out must be a folder directly in benchmarks/results (got {out_dir})")
    if _git_ignored(out_dir):
        raise SystemExit(f"--update-readme: {out_dir} is ignored by git (a timestamped run folder); "
                         f"pick --out benchmarks/results/<tag>")
    start, end = markers(device_type)
    text = readme.read_text()
    if start not in text or end not in text or text.index(end) < text.index(start):
        raise SystemExit(f"--update-readme: {readme} has no block between {start} and {end} to rewrite")
    return out_dir.relative_to(results_root.parent.parent).as_posix()


def _git_ignored(path: Path) -> bool:
    try:
        result = subprocess.run(["git", "check-ignore", "-q", str(path / "results.json")], cwd=REPO_ROOT,
                                capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def block(result_set: str, meta: dict, ceilings, sections: list, n_flagged: int = 0, what: str = "result set") -> str:
    """The README text for one result set: where it is, machine, command, ceilings (None: left out),
    headline tables, and how many headline rows are flagged (listed in its summary.md)."""
    kind = "CPU" if meta["device"] == "cpu" else "GPU"
    lines = [f"Committed {kind} {what} (`{result_set}/`), copied from its `summary.md` by "
             f"`python -m benchmarks --update-readme`. {machine_line(meta)}",
             "", f"Command: `{meta['command']}`"] + (["", ceilings_line(ceilings)] if ceilings else [])
    if n_flagged:
        lines += ["", f"{n_flagged} headline row(s) of this run are flagged (`~` noisy, `^` faster than a measured "
                      f"ceiling); `{result_set}/summary.md` lists them."]
    for title, table in sections:
        lines += ["", f"### Headline: {title}", "", table]
    return "\n".join(lines)


def update(text: str, device_type: str, new_block: str) -> str:
    """``text`` with the block of ``device_type`` replaced by ``new_block``."""
    start, end = markers(device_type)
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + "\n" + new_block + "\n" + text[j:]


def write(device_type: str, new_block: str, readme: Path = None) -> None:
    readme = readme or README
    readme.write_text(update(readme.read_text(), device_type, new_block))
