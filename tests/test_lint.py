"""ruff finds nothing in any Python file of the tool, under the committed configuration
(pyproject.toml, and tests/ruff.toml for the tests' longer lines)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.noroot

REPO = Path(__file__).resolve().parent.parent
FILES = sorted(
    [REPO / "nbtunnel.py", *(path for part in ("plugins", "bench", "tests") for path in REPO.glob(f"{part}/*.py"))]
)


def ruff_argv() -> list[str] | None:
    """How to run ruff here: the module of this Python's environment, else one on PATH."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    found = shutil.which("ruff")
    return [found] if found else None


RUFF = ruff_argv()
needs_ruff = pytest.mark.skipif(RUFF is None, reason="ruff is not installed (tests/run installs it)")


def ruff_check(*args: str) -> list[dict]:
    """ruff check ARGS from the repository; its findings (ruff itself failing fails the test)."""
    assert RUFF is not None
    proc = subprocess.run(
        [*RUFF, "check", "--no-cache", "--exit-zero", "--output-format", "json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def findings() -> dict[Path, list[str]]:
    """Every finding in FILES, one line each, by file."""
    found: dict[Path, list[str]] = {}
    for item in ruff_check(*map(str, FILES)):
        where = item["location"]
        found.setdefault(Path(item["filename"]).resolve(), []).append(
            f"{item['filename']}:{where['row']}:{where['column']}: {item['code']} {item['message']}"
        )
    return found


@needs_ruff
@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_ruff_finds_nothing(findings, path):
    if findings.get(path):
        pytest.fail("\n".join(findings[path]), pytrace=False)


@needs_ruff
def test_the_configuration_reports_what_it_selects(tmp_path):
    """The check above can fail: a file with one finding of each selected kind is reported."""
    bad = tmp_path / "bad.py"
    long_line = "x = " + "1" * 117  # 121 characters
    bad.write_text(
        "import sys\nimport os\n\n\n"  # I001 unsorted, F401 unused (twice)
        "def f(a=[]):  \n"  # B006 mutable default, W291 trailing space
        "    return a\n\n\n"
        f"{long_line}\n"  # E501, at 100 (the tool) and at 120 (the tests) alike
        f"{long_line[:101]}\n"  # 101 characters: E501 at 100 only
    )
    for config, long_rows in (("pyproject.toml", [9, 10]), ("tests/ruff.toml", [9])):
        found = ruff_check("--config", str(REPO / config), str(bad))
        codes = {item["code"] for item in found}
        assert {"I001", "F401", "B006", "W291", "E501"} <= codes, (config, found)
        rows = [item["location"]["row"] for item in found if item["code"] == "E501"]
        assert rows == long_rows, (config, found)


def test_the_module_docstring_lists_every_section_in_order():
    """The table of contents in nbtunnel.py's docstring names each banner, in file order."""
    import re

    import nbtunnel

    source = (REPO / "nbtunnel.py").read_text()
    banners = [m.group(1) for m in re.finditer(r"^# (\S.*?) (?:#{4,}|-{4,})$", source, re.MULTILINE)]
    banners = [b for b in banners if not b.startswith("Remote side: end")]
    contents = nbtunnel.__doc__.split("Contents, top to bottom", 1)[1]
    contents = " ".join(contents.split())
    where = 0
    for banner in banners:
        name = banner.replace("Remote side: begin", "Remote side").split(" (")[0]
        found = contents.find(name, where)
        assert found >= 0, f"section {banner!r} is not in the docstring's contents after offset {where}"
        where = found + len(name)
