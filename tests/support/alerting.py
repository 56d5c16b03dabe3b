"""Helpers for the alert tests: read the rules file, render annotations as Prometheus would.

promtool's rule unit tests compare alert annotations exactly, so the tests need the rendered text.
The rules use only ``{{ $labels.NAME }}`` in their templates (kept that simple on purpose:
on-call text should not depend on a value that changes every evaluation), which this renders.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "daemonset" / "alerts" / "sockops-rules.yaml"
RULE_TESTS = REPO / "daemonset" / "alerts" / "tests.yaml"
PROMETHEUS_RULE = REPO / "daemonset" / "prometheusrule.yaml"

_TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def load_rules(path: Path = RULES) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def alerts(rules: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """alertname -> rule, over every group."""
    rules = rules or load_rules()
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


def render(template: str, labels: dict[str, str]) -> str:
    """Render ``{{ $labels.NAME }}``; any other template action is an error (see module doc)."""

    def sub(m: re.Match[str]) -> str:
        label = _LABEL.fullmatch(m.group(1))
        if not label:
            raise ValueError(f"unsupported template action {m.group(0)!r}: use only $labels.NAME")
        return labels.get(label.group(1), "")

    return _TEMPLATE.sub(sub, template)


def expected_alert(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """One entry of promtool's exp_alerts: the alert's labels (plus its own) and annotations."""
    rule = alerts()[name]
    all_labels = {**labels, **rule.get("labels", {})}
    return {
        "exp_labels": all_labels,
        "exp_annotations": {k: render(v, all_labels) for k, v in rule.get("annotations", {}).items()},
    }


_PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.:])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (good enough for the expressions in this repo:
    strings, label matchers, ranges and grouping clauses are removed; what is left that is not a
    function call, a keyword or a number is a metric name)."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        is_call = text[m.end() :].lstrip().startswith("(")
        if not is_call and m.group(0).lower() not in _PROMQL_KEYWORDS:
            names.add(m.group(0))
    return names


def assert_generated_files_fresh() -> None:
    """The PrometheusRule and the dashboard ConfigMap are what scripts/gen_monitoring.py makes."""
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_monitoring.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
