"""Alert rules: promtool checks and unit-tests them, each alert fires and stays quiet where it should,
the PrometheusRule carries exactly the same groups, and alerts fed with a *real* scrape fire:
a full sockhash and a detached sock_ops program of a real data plane. Every alert links its
section of docs/RUNBOOKS.md, speaks of the node (not the scrape address), platform alerts carry
no workload namespace, and the scrapes of a real idle agent and of a real agent after
`sockops uninstall` fire only the alert that names their state.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Plane, wait_drained
from support.agentproc import AgentProcess, agents, sockops, wait_for
from support.alerting import (
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
from support.metrics_view import (
    PairTraffic,
    Samples,
    detach_sock_ops,
    plane_view,
    real_scrape,
    scrape,
    value,
)

from lab.cgroups import Cgroup
from lab.podlab import Lab
from sockops.maps import MapSizes
from sockops.metrics import build_registry

# The target labels the shipped scrape configs give every series (docs/OBSERVABILITY.md).
INSTANCE = {"job": "sockops", "instance": "10.0.0.1:9876", "node": "node-a"}
RUNBOOKS = REPO / "docs" / "RUNBOOKS.md"
# Alerts about the platform, not about one workload: they must not carry a workload namespace.
PLATFORM_ALERTS = ("SockopsRedirectMissRatioHigh", "SockopsSockhashFull")


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
        "SockopsReconcileErrors", "SockopsWatchRestartLoop", "SockopsSockhashFull", "SockopsReconcileStale",
        "SockopsPodsPendingTooLong", "SockopsMapsNotLoaded",
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


def _runbook_sections() -> dict[str, str]:
    """GitHub-style anchor of each `## ` heading of docs/RUNBOOKS.md -> the section's text."""
    sections: dict[str, str] = {}
    for block in re.split(r"^## ", RUNBOOKS.read_text(), flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        anchor = re.sub(r"[^a-z0-9 -]", "", title.strip().lower()).replace(" ", "-")
        sections[anchor] = body
    return sections


def test_every_alert_links_a_runbook_that_says_what_to_check_and_fix() -> None:
    sections = _runbook_sections()
    for name, rule in alerts().items():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/RUNBOOKS.md" and anchor == name.lower(), f"{name}: runbook_url {url!r}"
        assert anchor in sections, f"{name}: docs/RUNBOOKS.md has no section '## {name}'"
        body = sections[anchor]
        for part in ("**Means**", "**Check**", "**Fix**"):
            assert part in body, f"docs/RUNBOOKS.md '## {name}' lacks {part}"
        assert "```" in body, f"docs/RUNBOOKS.md '## {name}': give the commands to check"


def test_alerts_speak_of_the_node_not_the_scrape_address() -> None:
    for name, rule in alerts().items():
        for key, text in rule["annotations"].items():
            assert "$labels.instance" not in text, f"{name} {key}: name the node ($labels.node)"
        if name != "SockopsAgentMissing":  # absent() has no target labels at all
            assert "$labels.node" in rule["annotations"]["summary"], name
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", rule["expr"]):
            labels = {g.strip() for g in grouping.split(",")}
            assert "node" in labels or labels <= {"job", "instance"}, f"{name}: groups by {labels}"


def test_platform_alerts_carry_no_workload_namespace() -> None:
    """Namespace-based routing would page the app team of a pod for a data-plane problem."""
    rules = alerts()
    for name in PLATFORM_ALERTS:
        grouped = re.findall(r"\bby\s*\(([^)]*)\)", rules[name]["expr"])
        assert grouped, f"{name}: aggregate the per-pod series away"
        for g in grouped:
            assert {x.strip() for x in g.split(",")} == {"job", "node"}, f"{name}: by ({g})"


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
    ``after`` up to ``total``; every sockops_* sample, with the target labels Prometheus adds.
    promtool's clock starts at 0, so a timestamp gauge that is set (a reconcile just happened)
    becomes one that keeps up with that clock; one never set (0) stays 0."""
    out = []
    for name in sorted(set(before) | set(after)):
        if not name.startswith("sockops_") or name.endswith("_created"):
            continue
        for labels in sorted(set(before.get(name, {})) | set(after.get(name, {}))):
            a = before.get(name, {}).get(labels, after.get(name, {}).get(labels))
            b = after.get(name, {}).get(labels, a)
            lab = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted({**dict(labels), **INSTANCE}.items()))
            values = f"{a!r}x{switch_at - 1} {b!r}x{total - switch_at}"
            if name.endswith("_timestamp_seconds") and a and b:
                values = f"0+60x{total - 1}"  # a wall-clock time of now: follows promtool's clock
            out.append({"series": f"{name}{{{lab}}}", "values": values})
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
    registry, metrics = build_registry(plane_view(plane, sizes, {cookie: ("shop", "cart")}))
    metrics.last_reconcile.set_to_current_time()  # an agent that reconciles

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
    plane.dp.attach(plane.cgroup)  # restored, so the held connections' close callbacks clean up
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


def _agent_samples(agent: AgentProcess) -> Samples:
    out: Samples = {}
    for (name, labels), v in agent.metrics().items():
        out.setdefault(name, {})[labels] = v
    return out


def _only_fires(promtool: str, tmp_path: Path, samples: Samples, name: str, expected: str) -> None:
    """Thirty minutes of these real samples: ``expected`` fires on the node, every other alert not."""
    shutil.copy(RULES, tmp_path / RULES.name)
    checks = [
        {
            "eval_time": "30m",
            "alertname": a,
            "exp_alerts": [expected_alert(a, INSTANCE)] if a == expected else [],
        }
        for a in alerts()
        if a != "SockopsAgentMissing"
    ]
    series = [*_series(samples, samples, 1, 31), {"series": _up(), "values": "1x31"}]
    doc = {
        "rule_files": [RULES.name],
        "evaluation_interval": "1m",
        "tests": [{"name": name, "interval": "1m", "input_series": series, "alert_rule_test": checks}],
    }
    (tmp_path / f"{expected}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    res = run_promtool(promtool, "test", "rules", f"{expected}.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def _up() -> str:
    return "up{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(INSTANCE.items())) + "}"


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_idle_and_uninstalled_agents_fire_only_the_alert_that_names_why(
    promtool: str, cgroup: Cgroup, tmp_path: Path
) -> None:
    """Two real agents, scraped over HTTP as Prometheus would: one idle (SOCKOPS_IF_UNSUPPORTED=idle
    where it cannot load: its bpffs is a plain directory), one running until `sockops uninstall`.
    Fed to the rules for 30 minutes, the idle one fires SockopsKernelUnsupported and nothing else,
    the uninstalled one SockopsMapsNotLoaded and nothing else (no SockopsProgramDetached, no stale
    reconcile)."""
    from conftest import BPFFS_ROOT, TEST_PREFIX

    bpffs = BPFFS_ROOT / f"{TEST_PREFIX}-alerts-{secrets.token_hex(3)}"
    with agents(cgroup.path, bpffs) as started:
        idle = AgentProcess(
            cgroup.path, tmp_path / "plain-dir" / "sockops", tmp_path,
            ["--source", "static", "--if-unsupported", "idle"], name="idle",
        )  # fmt: skip
        started.append(idle)
        wait_for(lambda: idle._answers("/healthz", 200), 30, "idle agent /healthz")
        idle_samples = _agent_samples(idle)
        assert value(idle_samples, "sockops_kernel_supported") == 0
        idle.stop()

        running = AgentProcess(cgroup.path, bpffs, tmp_path, ["--source", "static"], name="running")
        started.append(running)
        running.wait_ready()
        res = sockops(
            "uninstall", "--cgroup", str(cgroup.path), "--bpffs", str(bpffs), "--drain-timeout", "5"
        )
        assert res.returncode == 0, res.stderr
        wait_for(lambda: running.metric("sockops_maps_loaded") == 0, 10, "maps_loaded 0 after uninstall")
        time.sleep(2.5)  # programs_attached is cached for 2 s
        gone = _agent_samples(running)
        assert value(gone, "sockops_kernel_supported") == 1
        assert value(gone, "sockops_program_attached", program="sock_ops") == 0
        running.stop()

    (tmp_path / "idle").mkdir()
    (tmp_path / "gone").mkdir()
    _only_fires(promtool, tmp_path / "idle", idle_samples, "idle agent", "SockopsKernelUnsupported")
    _only_fires(promtool, tmp_path / "gone", gone, "uninstalled agent", "SockopsMapsNotLoaded")
