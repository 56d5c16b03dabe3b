"""The code stays ruff clean (lint and format), so CI rejects a change that is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREES = ["sockops", "lab", "tests", "bench", "scripts"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *TREES], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_ruff_check() -> None:
    res = ruff("check")
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format() -> None:
    res = ruff("format", "--check")
    assert res.returncode == 0, res.stdout + res.stderr


def _layout_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1].splitlines()


def test_readme_layout_matches_the_tree() -> None:
    """README's Layout names what is there: each path it lists exists, and each module of the
    agent (sockops/) and the lab (lab/) is listed, so a newcomer finds every idea by name."""
    named: set[str] = set()
    for line in _layout_block():
        first = line.split("  ")[0].strip()
        for path in (p.strip() for p in first.split(",")):
            if "/" in path or "." in path:
                named.add(path)
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert missing == [], f"README's Layout lists paths that do not exist: {missing}"
    modules = [p for tree in ("sockops", "lab") for p in sorted((REPO / tree).glob("*.py"))]
    unlisted = [
        str(p.relative_to(REPO))
        for p in modules
        if p.name != "__init__.py" and str(p.relative_to(REPO)) not in named
    ]
    assert unlisted == [], f"modules missing from README's Layout: {unlisted}"
