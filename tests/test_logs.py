"""Log lines keep tracebacks, never let a field overwrite the level, and honour the log level."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sockops import logs


def record(exc: bool = False, **fields: object) -> logging.LogRecord:
    """A warning as the agent logs it, with ``fields`` and (``exc``) a live exception."""
    exc_info = None
    if exc:
        try:
            raise RuntimeError("the source crashed here")
        except RuntimeError:
            exc_info = sys.exc_info()
    r = logging.LogRecord(
        "sockops.agent", logging.WARNING, __file__, 1, "source crashed; restarting", (), exc_info
    )
    if fields:
        r.fields = fields
    return r


def test_json_keeps_the_traceback_and_protects_reserved_keys() -> None:
    line = logs.JsonFormatter().format(record(level="debug", msg="x", pod="a"))
    doc = json.loads(line)
    assert doc["level"] == "warning" and doc["msg"] == "source crashed; restarting"
    assert doc["field.level"] == "debug" and doc["field.msg"] == "x" and doc["pod"] == "a"

    doc = json.loads(logs.JsonFormatter().format(record(exc=True)))
    assert "Traceback (most recent call last)" in doc["traceback"]
    assert "RuntimeError: the source crashed here" in doc["traceback"]


def test_text_keeps_the_traceback_below_the_line() -> None:
    text = logs.TextFormatter().format(record(level="debug"))
    assert " warning source crashed; restarting field.level=debug" in text
    text = logs.TextFormatter().format(record(exc=True))
    first, *rest = text.splitlines()
    assert first.endswith("warning source crashed; restarting")
    assert any("RuntimeError: the source crashed here" in line for line in rest)
    assert all(line.startswith("    ") for line in rest)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("how", ["flag", "env"])
def test_log_level_setting(tmp_path: Path, how: str) -> None:
    """An agent that idles (no bpffs where it is told to pin) logs an error and info lines;
    at level error only the error remains."""
    argv = [sys.executable, "-m", "sockops.cli", "agent", "--source", "static", "--log-format", "json",
            "--if-unsupported", "idle",
            "--bpffs", str(tmp_path / "not-bpffs" / "x"), "--metrics-addr", "127.0.0.1:0",
            "--state-file", str(tmp_path / "state.json")]  # fmt: skip
    env = dict(os.environ)
    if how == "flag":
        argv += ["--log-level", "error"]
    else:
        env["SOCKOPS_LOG_LEVEL"] = "error"
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())  # the idle agent's one error
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=10)
    assert first["level"] == "error" and "not accelerating" in first["msg"], first
    levels = [json.loads(line)["level"] for line in rest.splitlines() if line.startswith("{")]
    assert set(levels) <= {"error"}, rest
