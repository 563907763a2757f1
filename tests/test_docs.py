"""The documentation's printed examples stay true: every ``>>>`` example in README.md and docs/*.md runs."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_markdown_examples(path):
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE,
                              verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {path.name} failed (see above)"


def test_readme_shows_what_the_default_study_prints():
    """The README's copy of `python -m crosscheck.linear` output is exactly what the command prints today."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- crosscheck.linear default output.*?-->\n```text\n(.*?)\n```", readme, re.S)
    assert block, "README.md lost its marked crosscheck.linear output block"
    run = subprocess.run([sys.executable, "-m", "crosscheck.linear"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip("\n") == block.group(1), "README.md's study output drifted: paste the new output"


def test_readme_figures_are_what_the_study_draws(tmp_path):
    """images/*.png, shown in the README, are byte for byte what `--plots` draws today (matplotlib is pinned by
    constraints.txt; regenerate with `python -m crosscheck.linear --plots images` after a deliberate change)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "crosscheck.linear", "--plots", str(tmp_path), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    committed = sorted(p.name for p in (ROOT / "images").glob("*.png"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.png"))
    readme = (ROOT / "README.md").read_text()
    for name in committed:
        assert f"images/{name}" in readme, f"images/{name} is not shown in the README"
        assert (ROOT / "images" / name).read_bytes() == (tmp_path / name).read_bytes(), f"images/{name} drifted"
