"""The documentation as a reader meets it: every option that --help shows is documented in
README.md or docs/, the README stays a short guide, and the links between the documents
land on a file and a heading that exist.

None of these connect anywhere: they run as any user (`pytest -m noroot`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 400

pytestmark = pytest.mark.noroot


def help_text(tmp: Path) -> str:
    """`nbtunnel.py --help` with the shipped plugins and no user's config or plugins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBTUNNEL_", "XDG_"))}
    env.update(XDG_CONFIG_HOME=str(tmp / "config"), XDG_STATE_HOME=str(tmp / "state"),
               COLUMNS="80")
    proc = subprocess.run([sys.executable, str(REPO / "nbtunnel.py"), "--help"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def help_flags(text: str) -> list:
    """Every flag of --help TEXT: the option lines (`  -F FILE, --ssh-config FILE  help`)."""
    flags = []
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            flags += [item.split()[0] for item in invocation.split(", ")]
    return flags


def documents() -> list:
    """The user's documents: README.md and docs/*.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def undocumented(flags: list, text: str) -> list:
    """The FLAGS that TEXT never names as a whole word (`--time` is not `--timeout`)."""
    return [f for f in flags if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(f), text)]


def test_every_option_of_help_is_documented(tmp_path):
    flags = help_flags(help_text(tmp_path))
    # the shipped plugins' options are there: a --help without them would prove little
    assert {"--session", "--ssh-config", "-F", "--partition", "--sbatch-arg", "--queue",
            "--qsub-arg", "--conda", "--module"} <= set(flags), flags
    text = "\n".join(path.read_text() for path in documents())
    assert undocumented(flags, text) == []


def test_help_says_where_the_reference_is(tmp_path):
    assert "docs/reference.md" in help_text(tmp_path)
    assert (REPO / "docs" / "reference.md").is_file()


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    for doc in ("docs/reference.md", "docs/how-it-works.md", "docs/security.md",
                "docs/clusters.md", "docs/plugins.md", "bench/README.md", "tests/README.md"):
        assert "](%s)" % doc in "\n".join(lines), doc  # where to read more


def anchors(path: Path) -> set:
    """The anchors of PATH's headings, as GitHub makes them (code blocks skipped)."""
    found, code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        heading = not code and re.match(r"#{1,6} (.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", [*documents(), REPO / "bench" / "README.md",
                                  REPO / "tests" / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_links_land_on_a_file_and_heading(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists() or anchor and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []
