"""The README's threat model names the tests that play each row: they must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _threat_model() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Threat model")
    return readme[start : readme.index("\n### ", start + 1)]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def test_every_test_the_threat_model_names_exists() -> None:
    section = _threat_model()
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    assert len(rows) >= 5
    named = 0
    for row in rows:
        current: Path | None = None
        folder = ROOT / "tests" / "privacy"  # a bare name: beside the last path given
        # `file.py::test`, `::test` (in the last file named in the row) or `file.py`.
        for file, test in re.findall(r"`((?:tests/)?[\w/]*\.py)?(::\w+)?`", row):
            if file:
                current = ROOT / file if file.startswith("tests/") else folder / file
                folder = current.parent
                assert current.exists(), f"the threat model names {file}, which does not exist"
            if test:
                assert current is not None, f"{test} names no file"
                assert test[2:] in _test_names(current), f"{current.name}{test} does not exist"
                named += 1
    assert named >= 15  # the rows name their tests, not just their files
