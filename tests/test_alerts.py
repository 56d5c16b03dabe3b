"""Alert rules: promtool checks and unit-tests them, each alert fires and stays quiet where it should,
the PrometheusRule carries exactly the same groups, and alerts fed with a *real* scrape fire:
a full sockhash and a detached sock_ops program of a real data plane.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from alerting import (
    PROMETHEUS_RULE,
    REPO,
    RULE_TESTS,
    RULES,
    alerts,
    assert_generated_files_fresh,
    expected_alert,
    load_rules,
    metric_names,
)
from conftest import Plane
from metrics_view import (
    PairTraffic,
    Samples,
    detach_sock_ops,
    plane_view,
    real_scrape,
    scrape,
    value,
    wait_drained,
)

from sockops.loader import MapSizes
from sockops.metrics import build_registry
from sockops.podlab import Lab

INSTANCE = {"job": "sockops", "instance": "node-a:9876"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: apt-get install prometheus (scripts/setup.sh installs it)")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# -- the rules themselves ------------------------------------------------------------------------


def test_promtool_check_rules(promtool: str) -> None:
    res = run_promtool(promtool, "check", "rules", str(RULES), cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in res.stdout


def test_promtool_unit_tests(promtool: str) -> None:
    res = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) - fired == set(), "alerts never tested firing"
    assert set(alerts()) - quiet == set(), "alerts never tested staying quiet"


def test_required_alerts_exist_and_are_understandable() -> None:
    rules = alerts()
    for name in (
        "SockopsAgentDown", "SockopsAgentMissing", "SockopsProgramDetached", "SockopsKernelUnsupported",
        "SockopsSockhashNearlyFull", "SockopsOrigdstMapNearlyFull", "SockopsRedirectMissRatioHigh",
        "SockopsReconcileErrors", "SockopsWatchRestartLoop",
    ):  # fmt: skip
        assert name in rules
    for name, rule in rules.items():
        assert rule.get("for"), f"{name}: no `for`"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        ann = rule["annotations"]
        assert set(ann) >= {"summary", "description"}, name
        assert len(ann["summary"]) <= 120, f"{name}: summary too long for a page"
        assert len(ann["description"]) >= 150, f"{name}: description must say what to check"
        # Each description names a command or place to look.
        assert any(w in ann["description"] for w in ("kubectl", "sockops ", "bpftool", "ls ")), name


def test_prometheusrule_has_the_same_groups() -> None:
    assert_generated_files_fresh()
    doc = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "sockops"
    assert doc["spec"]["groups"] == load_rules()["groups"]


# -- against the real exporter -------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.timeout(60)
def test_alerts_use_only_exported_metrics(dataplane: Plane, lab: Lab) -> None:
    names = set(real_scrape(dataplane, lab.add_pod("cart", ip="10.244.1.10", sidecar=False)))
    for name, rule in alerts().items():
        unknown = metric_names(rule["expr"]) - names - {"up"}
        assert not unknown, f"{name} uses metrics the agent does not export: {unknown}"
    wait_drained(dataplane)


def _series(before: Samples, after: Samples, switch_at: int, total: int) -> list[dict[str, str]]:
    """promtool input series from two real scrapes: ``before`` for the first ``switch_at`` minutes,
    ``after`` up to ``total``; every sockops_* sample, with the target labels Prometheus adds."""
    out = []
    for name in sorted(set(before) | set(after)):
        if not name.startswith("sockops_") or name.endswith("_created"):
            continue
        for labels in sorted(set(before.get(name, {})) | set(after.get(name, {}))):
            a = before.get(name, {}).get(labels, after.get(name, {}).get(labels))
            b = after.get(name, {}).get(labels, a)
            lab = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted({**dict(labels), **INSTANCE}.items()))
            out.append(
                {"series": f"{name}{{{lab}}}", "values": f"{a!r}x{switch_at - 1} {b!r}x{total - switch_at}"}
            )
    return out


@pytest.mark.kernel
@pytest.mark.timeout(90)
def test_full_sockhash_and_detached_program_fire_alerts(
    promtool: str, make_dataplane: Callable[..., Plane], lab: Lab, tmp_path: Path
) -> None:
    """A sockhash for 4 sockets, filled by 2 held connections: the scrape shows it full. Then the
    sock_ops program is detached from the cgroup: the next scrape shows it. The two real scrapes,
    as promtool input series (full from minute 0, detached from minute 10), fire
    SockopsSockhashNearlyFull and SockopsProgramDetached{program="sock_ops"}, and nothing else."""
    sizes = MapSizes(sockhash=4, pending=4)
    plane = make_dataplane(sizes)
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    cookie = plane.enable(pod)
    registry, _ = build_registry(plane_view(plane, sizes, {cookie: ("shop", "cart")}))

    traffic = PairTraffic(pod, 2, 100, 2, hold=True)
    traffic.held()
    full = scrape(registry)
    assert value(full, "sockops_sockets_active") == 4
    assert value(full, "sockops_sockmap_capacity") == 4
    assert value(full, "sockops_program_attached", program="sock_ops") == 1
    detach_sock_ops(plane.bpffs_dir)
    detached = scrape(registry)
    assert value(detached, "sockops_program_attached", program="sock_ops") == 0
    assert value(detached, "sockops_program_attached", program="sk_msg") == 1
    assert traffic.finish()["mismatches"] == 0
    wait_drained(plane)

    def check(at: str, name: str, fired: list[dict[str, str]]) -> dict[str, Any]:
        return {"eval_time": at, "alertname": name, "exp_alerts": [expected_alert(name, f) for f in fired]}

    firing = {
        "SockopsSockhashNearlyFull": [INSTANCE],
        "SockopsProgramDetached": [{**INSTANCE, "program": "sock_ops"}],
    }
    checks = [check("5m", "SockopsProgramDetached", []), check("5m", "SockopsSockhashNearlyFull", [])]
    checks += [
        check("25m", name, firing.get(name, [])) for name in alerts() if name not in {"SockopsAgentMissing"}
    ]
    shutil.copy(RULES, tmp_path / RULES.name)
    doc = {
        "rule_files": [RULES.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "real scrape: full sockhash, then sock_ops detached",
                "interval": "1m",
                "input_series": [
                    *_series(full, detached, 10, 30),
                    {"series": 'up{job="sockops", instance="node-a:9876"}', "values": "1x30"},
                ],
                "alert_rule_test": checks,
            }
        ],
    }
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    res = run_promtool(promtool, "test", "rules", "real.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
