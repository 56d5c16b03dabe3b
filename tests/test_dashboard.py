"""The Grafana dashboard loads and shows what the agent really exports.

Structure is checked the way Grafana needs it (panels with a Prometheus datasource, targets and a
grid position inside the 24-column grid, no overlaps, unique ids and refIds, defined variables);
every query is valid PromQL (promtool parses it as a recording rule) and uses only metric names
that a real scrape of the agent's registry contains; the ConfigMap carries the file verbatim with
the label Grafana's dashboard sidecar looks for. Nodes are chosen by name ($node), workloads by
$namespace and $pod, per-pod panels draw the top ten, and the agent's own CPU and memory show.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Plane, wait_drained
from support.alerting import REPO, assert_generated_files_fresh, metric_names
from support.metrics_view import real_scrape

from lab.podlab import Lab

DASHBOARD = REPO / "daemonset" / "dashboard" / "sockops.json"
CONFIGMAP = REPO / "daemonset" / "dashboard-configmap.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in load()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def variable_queries() -> list[str]:
    """The PromQL inside each query variable's label_values(...)."""
    out = []
    for v in load()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["query"]["query"])
            assert m and v["definition"] == v["query"]["query"], v["name"]
            out.append(m.group(1))
    return out


def test_dashboard_structure() -> None:
    d = load()
    assert d["uid"] == "sockops" and d["title"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for name in ("node", "namespace", "pod"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE, name
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    boxes = []
    for p in d["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        boxes.append((p["title"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
            assert not overlap, f"panels {a[0]!r} and {b[0]!r} overlap"
    for p in panels():
        assert p["type"] in {"timeseries", "stat"}, p["title"]
        assert p["title"] and p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == DATASOURCE, p["title"]
            used = set(re.findall(r"\$(\w+)", t["expr"]))
            assert used <= set(variables) | GRAFANA_BUILTINS, (p["title"], used)


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    text = " ".join(exprs())
    for metric in (
        "sockops_redirected_bytes_total",  # accelerated bytes/s per pod
        "sockops_redirect_misses_total",  # miss ratio
        "sockops_sockmap_capacity",  # map fill
        "sockops_origdst_capacity",
        "sockops_sockets_active",  # sockets
        "sockops_enforce_latency_seconds_bucket",  # enforce latency
        "sockops_program_attached",  # agent health
        "up",
    ):
        assert re.search(rf"\b{metric}\b", text), metric
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text


def test_node_namespace_and_pod_variables_filter_what_they_name() -> None:
    """Nodes by name (the `node` target label), never by scrape address; the workload variables
    chained under the node, and applied to every per-pod query."""
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert "instance" not in variables
    assert variables["node"]["query"]["query"].endswith(", node)")
    assert '$node"' in variables["namespace"]["query"]["query"]
    assert variables["namespace"]["query"]["query"].endswith(", namespace)")
    assert '$namespace"' in variables["pod"]["query"]["query"]
    assert variables["pod"]["query"]["query"].endswith(", pod)")
    for v in ("node", "namespace", "pod"):
        assert variables[v]["multi"] and variables[v]["includeAll"] and variables[v]["allValue"] == ".*"
    for p in panels():
        for t in p["targets"]:
            assert "instance" not in t["expr"].replace("on (job, instance)", ""), p["title"]
            assert "{{instance}}" not in t["legendFormat"], p["title"]
            assert 'node=~"$node"' in t["expr"], p["title"]


def test_per_pod_panels_show_the_top_pods_of_the_selection() -> None:
    """110 pods a node times hundreds of nodes: a per-pod panel draws the busiest ten."""
    per_pod = [p for p in panels() if any("by (namespace, pod)" in t["expr"] for t in p["targets"])]
    assert len(per_pod) >= 3
    for p in per_pod:
        for t in p["targets"]:
            assert re.match(r"topk\(\d+, ", t["expr"]), p["title"]
            for sel in t["expr"].split("{")[1:]:
                assert 'namespace=~"$namespace"' in sel and 'pod=~"$pod"' in sel, p["title"]


def test_agent_cpu_and_memory_panels() -> None:
    by_metric = {
        metric: [p for p in panels() if any(metric in t["expr"] for t in p["targets"])]
        for metric in ("process_cpu_seconds_total", "process_resident_memory_bytes")
    }
    (cpu,) = by_metric["process_cpu_seconds_total"]
    (mem,) = by_metric["process_resident_memory_bytes"]
    assert "rate(process_cpu_seconds_total" in cpu["targets"][0]["expr"]
    assert mem["fieldConfig"]["defaults"]["unit"] == "bytes"
    assert cpu["targets"][0]["legendFormat"] == mem["targets"][0]["legendFormat"] == "{{node}}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed: apt-get install prometheus (scripts/setup.sh installs it)")
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": re.sub(r"\$(node|namespace|pod)\b", ".*", e.replace("$__rate_interval", "5m")),
        }
        for i, e in enumerate(exprs() + variable_queries())
    ]
    (tmp_path / "dashboard-rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]})
    )
    res = subprocess.run(
        [promtool, "check", "rules", "dashboard-rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_configmap_carries_the_dashboard() -> None:
    assert_generated_files_fresh()
    cm = yaml.safe_load(CONFIGMAP.read_text())
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["sockops.json"] == DASHBOARD.read_text()
    assert json.loads(cm["data"]["sockops.json"]) == load()


@pytest.mark.kernel
@pytest.mark.timeout(60)
def test_dashboard_uses_only_exported_metrics(dataplane: Plane, lab: Lab) -> None:
    names = set(real_scrape(dataplane, lab.add_pod("cart", ip="10.244.1.10", sidecar=False)))
    for p in panels():
        for t in p["targets"]:
            unknown = metric_names(t["expr"]) - names - {"up"}
            assert not unknown, f"panel {p['title']!r} queries metrics the agent does not export: {unknown}"
    wait_drained(dataplane)
