"""The documentation stays true: every ``>>>`` example in README.md and docs/*.md runs, the README's copy of the
study's output is what the command prints (on any machine), its figures are what the study draws, and every
reference to a section or an equation of docs/numerics.md points at one that exists."""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NUMERICS = ROOT / "docs" / "numerics.md"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_markdown_examples(path):
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE,
                              verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {path.name} failed (see above)"


# ----------------------------------------------------------------------------------------------------------------
# the README's copy of the default study


OTHER_MACHINE = {
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # torch's MKL sgemm as on an AMD CPU (MKL takes its AVX2 path there)
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",  # fbgemm's kernels on a CPU without AVX-512 VNNI
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's ATen kernels on a CPU without AVX-512
}
"""A machine unlike the one the README block was pasted on, simulated by the dispatch variables of the libraries."""


@pytest.mark.isa
@pytest.mark.parametrize("machine", ["this machine", "simulated AMD without VNNI"])
def test_readme_shows_what_the_default_study_prints(machine):
    """The README's copy of `python -m crosscheck.linear` output is what the command prints, here and on a machine
    with other CPU features: the lines and figures crosscheck.report.MACHINE_DEPENDENT names (the machine and
    kernel lines, refquant's own float forward against torch's MKL sgemm) are masked on both sides, and everything
    else — every number of the study, every parity row — must be identical."""
    from crosscheck.report import mask_machine_dependent

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- crosscheck.linear default output.*?-->\n```text\n(.*?)\n```", readme, re.S)
    assert block, "README.md lost its marked crosscheck.linear output block"
    env = dict(os.environ, **(OTHER_MACHINE if machine != "this machine" else {}))
    run = subprocess.run([sys.executable, "-m", "crosscheck.linear"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    printed = run.stdout.rstrip("\n")
    assert mask_machine_dependent(printed) != printed, "nothing was masked: MACHINE_DEPENDENT no longer matches"
    assert mask_machine_dependent(printed) == mask_machine_dependent(block.group(1)), \
        f"README.md's study output drifted ({machine}): paste the new output"


@pytest.mark.isa
def test_readme_figures_are_what_the_study_draws(tmp_path):
    """images/*.png, shown in the README, are byte for byte what `--plots` draws today (matplotlib is pinned by
    constraints.txt; regenerate with `python -m crosscheck.linear --plots images` after a deliberate change)."""
    run = subprocess.run([sys.executable, "-m", "crosscheck.linear", "--plots", str(tmp_path), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    committed = sorted(p.name for p in (ROOT / "images").glob("*.png"))
    assert committed == sorted(p.name for p in tmp_path.glob("*.png"))
    readme = (ROOT / "README.md").read_text()
    for name in committed:
        assert f"images/{name}" in readme, f"images/{name} is not shown in the README"
        assert (ROOT / "images" / name).read_bytes() == (tmp_path / name).read_bytes(), f"images/{name} drifted"


# ----------------------------------------------------------------------------------------------------------------
# references to docs/numerics.md: sections (§N, or a quoted title) and equation names (eq. L5, eqs. L4-L11)


REFERRING = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "crosscheck").glob("*.py")),
             *sorted((ROOT / "refquant").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
NAME = r"[A-Z]\d{1,2}[a-c]?"
EQ_REF = re.compile(rf"\beqs?\.\s*({NAME}(?:\s*(?:-|–|,|and)\s*{NAME})*)")
SECTION_REF = re.compile(r"§\s?(\d+)")
TITLE_REF = re.compile(r"numerics\.md[,:]?\s*[\"'“]([^\"'”]+)[\"'”]")
TOPICS = [  # (a word in the referring text, a word the section's title must then contain), first match decides
    (re.compile(r"\bMKL\b|sgemm"), "float Linear"),
    (re.compile(r"\bbias\b"), "bias"),
]


def numerics_sections() -> dict[str, str]:
    """{"1": "From a range to (scale, zero_point)", ...} and the unnumbered titles under their own text."""
    sections = {}
    for title in re.findall(r"^## (.+)$", NUMERICS.read_text(), re.M):
        number = re.match(r"(\d+)\.\s+(.*)", title)
        sections[number.group(1) if number else title] = number.group(2) if number else title
    return sections


def _expand(names: str) -> list[str]:
    """'L4-L11' -> L4 ... L11; 'P1-P3' -> P1, P2, P3; 'L6, L7' -> L6, L7; 'L10, L11' likewise."""
    out: list[str] = []
    parts = re.split(r"\s*(,|and|-|–)\s*", names)
    i = 0
    while i < len(parts):
        name = parts[i]
        if i + 2 < len(parts) and parts[i + 1] in ("-", "–"):
            letter, first = name[0], int(re.match(r"[A-Z](\d+)", name).group(1))
            last = int(re.match(r"[A-Z]?(\d+)", parts[i + 2]).group(1))
            out += [f"{letter}{k}" for k in range(first, last + 1)]
            i += 3
        else:
            if name not in (",", "and"):
                out.append(name)
            i += 1
    return out


def numerics_equations() -> set[str]:
    """The equation names docs/numerics.md defines: bold labels (**P1 — ...**, **L1–L3**, **F1, F2 — ...**) and the
    labels right after a formula: at the end of a formula line ((L5), (L10, L11)) or after a code span (`...` (Q1c))."""
    text = NUMERICS.read_text()
    defined: set[str] = set()
    for names in re.findall(rf"\*\*({NAME}(?:\s*(?:[–-]|,)\s*{NAME})*)", text):
        defined.update(_expand(names))
    for names in re.findall(rf"\(({NAME}(?:,\s*{NAME})*)\)\s*$", text, re.M):
        defined.update(_expand(names))
    for names in re.findall(rf"` \(({NAME}(?:,\s*{NAME})*)\)", text):
        defined.update(_expand(names))
    return defined


def references() -> list[tuple[str, int, str, str, str]]:
    """(file, line number, kind, target, context) for every reference to numerics.md in the referring files."""
    refs = []
    for path in REFERRING:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            context = (lines[i - 1] if i else "") + " " + line
            rel = str(path.relative_to(ROOT))
            refs += [(rel, i + 1, "section", m.group(1), context) for m in SECTION_REF.finditer(line)]
            refs += [(rel, i + 1, "title", m.group(1), context) for m in TITLE_REF.finditer(line)]
            for m in EQ_REF.finditer(line):
                refs += [(rel, i + 1, "equation", name, context) for name in _expand(m.group(1))]
    return refs


def test_every_reference_to_numerics_md_points_at_something_that_exists():
    """§N is a numbered section of docs/numerics.md, a quoted title is one of its headings, and every equation name
    (eq. X, eqs. X-Y) is one it defines (a bare L8 stands for the family L8a-L8c). A reference whose text is about
    torch's MKL sgemm must point at the section on the float Linear, one about the bias at the section on it."""
    sections = numerics_sections()
    equations = numerics_equations()
    assert {"1", "6", "8"} <= set(sections) and {"P1", "L5", "M2", "D1"} <= equations  # the parsers work
    refs = references()
    assert len([r for r in refs if r[2] == "equation"]) > 50 and any(r[2] == "section" for r in refs)
    wrong = []
    for path, line, kind, target, context in refs:
        where = f"{path}:{line}"
        if kind == "section":
            if target not in sections:
                last = max(int(n) for n in sections if n.isdigit())
                wrong.append(f"{where}: §{target} does not exist (numerics.md has §1-§{last})")
                continue
            for word, title_word in TOPICS:
                if word.search(context):
                    if title_word not in sections[target]:
                        wrong.append(f"{where}: §{target} ({sections[target]!r}) is not the section on "
                                     f"{title_word!r} this text is about")
                    break
        elif kind == "title":
            if not any(title.startswith(target) for title in sections.values()):
                wrong.append(f"{where}: numerics.md has no section titled {target!r}")
        elif target not in equations and not any(re.fullmatch(target + "[a-c]", e) for e in equations):
            wrong.append(f"{where}: equation {target} is not defined in docs/numerics.md")
    assert not wrong, "references into docs/numerics.md that point nowhere:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------------------------------------------
# what the README shows of the JSON and of CI


def test_readme_json_schema_is_the_one_crosscheck_documents():
    from crosscheck.report import JSON_SCHEMA

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"writes the whole comparison:\n\n```text\n(.*?\n)```", readme, re.S)
    assert block and block.group(1) == JSON_SCHEMA


def test_ci_runs_only_what_the_readme_shows():
    """.ci/run: the README's second command verbatim, and the commands of its "Tests" section, nothing else."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert readme.startswith("# refquant\n\n```bash\n") and len(commands[0].splitlines()) == 2  # first, exactly two
    second = commands[0].splitlines()[1]
    tests_section = readme[readme.index("\n## Tests\n"):]
    tests_commands = re.findall(r"```bash\n(.*?)```", tests_section[:tests_section.index("\n## ", 1)], re.S)
    shown = {second} | {line for block in tests_commands for line in block.splitlines() if line.strip()}
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci[0] == second and set(ci) <= shown and set(ci) == shown, (ci, shown)


def test_readme_says_how_to_get_the_cpu_build_and_the_advice_holds():
    """Elsewhere than on the project's machines, `torch==2.13.0` resolves to PyPI's CUDA build on Linux; the README
    adds PyTorch's CPU index as an extra index. Its reasoning is PEP 440's, checked with pip's own rules
    (``packaging``, which pytest depends on): the pin accepts 2.13.0+cpu, and 2.13.0+cpu is the higher candidate."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    readme = (ROOT / "README.md").read_text()
    pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch"))
    advice = [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in block.splitlines()
              if "--extra-index-url https://download.pytorch.org/whl/cpu" in line]
    assert advice and all(line.startswith("python -m pip install -c constraints.txt ") for line in advice), advice
    specifier = SpecifierSet(pin[len("torch"):])
    assert Version("2.13.0+cpu") in specifier and Version("2.13.0") in specifier
    assert max([Version("2.13.0"), Version("2.13.0+cpu")]) == Version("2.13.0+cpu")
    assert "--index-url" in readme and "2.13.0+cpu" in readme
