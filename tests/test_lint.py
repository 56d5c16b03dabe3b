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
