"""``kubectl sockops status NAMESPACE/POD``: why a pod is (not) accelerated, without exec.

kubectl runs any ``kubectl-NAME`` program on the PATH as ``kubectl NAME``; this one is installed
as the console script ``kubectl-sockops`` (pyproject.toml). An app team usually may not exec into
the agent, and does not know which node's agent to ask, so the plugin asks the API server:

1. the pod (``get pods`` in its namespace): which node it runs on;
2. the agent pods on that node (``list pods`` in the agent's namespace, by the DaemonSet's labels
   and ``spec.nodeName``);
3. that agent's ``/status`` through the API server's pod proxy (``get pods/proxy`` in the agent's
   namespace): the state and reason the agent decided for the pod, as ``sockops status`` shows.

Exit 0 when the agent reported the pod, 1 when it could not be asked or does not know the pod
(the message says which step failed and what to check).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sockops.errors import SockopsError

AGENT_LABELS = "app.kubernetes.io/name=sockops,app.kubernetes.io/component=agent"


class PluginError(SockopsError):
    """A step of the look-up failed; the message says which and what to check."""


def _json(resp: Any) -> Any:
    return json.loads(resp.data)


def lookup(api_client: Any, namespace: str, pod: str, agent_namespace: str, port: int) -> dict[str, Any]:
    """The agent's record of ``namespace/pod``, with where it came from (see the module doc)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)
    try:
        obj = _json(core.read_namespaced_pod(pod, namespace, _preload_content=False, _request_timeout=15))
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f"pod {namespace}/{pod} not found") from None
        raise PluginError(f"cannot read pod {namespace}/{pod}: {e.status} {e.reason}") from None
    node = (obj.get("spec") or {}).get("nodeName")
    if not node:
        raise PluginError(f"pod {namespace}/{pod} is not scheduled to a node yet")
    try:
        agents = _json(
            core.list_namespaced_pod(
                agent_namespace,
                label_selector=AGENT_LABELS,
                field_selector=f"spec.nodeName={node}",
                _preload_content=False,
                _request_timeout=15,
            )
        )["items"]
    except ApiException as e:
        raise PluginError(
            f"cannot list the sockops agents in namespace {agent_namespace}: {e.status} {e.reason} "
            "(wrong --agent-namespace, or no RBAC to list pods there)"
        ) from None
    running = [a for a in agents if (a.get("status") or {}).get("phase") == "Running"] or agents
    if not running:
        raise PluginError(
            f"no sockops agent runs on node {node} (namespace {agent_namespace}): the DaemonSet is not "
            f"installed, or the node is labelled sockops.io/agent=disabled, so pods there are not accelerated"
        )
    agent = running[0]["metadata"]["name"]
    try:
        resp = core.connect_get_namespaced_pod_proxy_with_path(
            f"{agent}:{port}", agent_namespace, "status", _preload_content=False, _request_timeout=15
        )
        status = _json(resp)
    except ApiException as e:
        raise PluginError(
            f"cannot read {agent_namespace}/{agent}'s status through the API server's pod proxy: "
            f"{e.status} {e.reason} (RBAC: get pods/proxy in {agent_namespace})"
        ) from None
    mine = [
        w for w in status.get("workloads", []) if w.get("namespace") == namespace and w.get("name") == pod
    ]
    return {"pod": f"{namespace}/{pod}", "node": node, "agent": f"{agent_namespace}/{agent}",
            "agent_state": status.get("agent"), "agent_ready": status.get("ready"),
            "workload": mine[0] if mine else None}  # fmt: skip


def render(found: dict[str, Any]) -> str:
    w = found["workload"]
    where = f"  node {found['node']}, agent {found['agent']} ({found['agent_state']})"
    if w is None:
        return (
            f"{found['pod']}: unknown to the agent\n{where}\n"
            "  the agent has not seen this pod yet (just created?) or its source is not kubernetes"
        )
    lines = [f"{found['pod']}: {w['state']}", f"  reason: {w['reason']}"]
    lines += [f"  ! {e}" for e in w.get("errors") or []]
    if w.get("capture"):
        lines.append(f"  Istio capture: {w['capture']}")
    if w.get("state") == "observing":
        from sockops.observe import render as render_observed

        lines += [f"  {line}" for line in render_observed(w.get("observed"))]
    if w.get("breaker"):
        from sockops.breaker import render as render_breaker

        lines.append(f"  {render_breaker(w['breaker'])}")
    lines.append(where)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kubectl sockops", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="the agent's state and reason for one pod")
    s.add_argument("pod", metavar="NAMESPACE/POD")
    s.add_argument("--agent-namespace", default="sockops-system", help="where the DaemonSet runs")
    s.add_argument("--port", type=int, default=9876, help="the agent's metrics port (SOCKOPS_METRICS_ADDR)")
    s.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    s.add_argument("--context", default=None)
    s.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    namespace, sep, pod = args.pod.partition("/")
    if not sep or not namespace or not pod:
        p.error(f"{args.pod!r}: write NAMESPACE/POD, e.g. shop/cart-7d9f")
    from sockops.sources.kubernetes import load_config

    try:
        found = lookup(
            load_config(args.kubeconfig, args.context), namespace, pod, args.agent_namespace, args.port
        )
    except SockopsError as e:
        print(f"kubectl sockops: {e}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2) if args.output == "json" else render(found))
    return 0 if found["workload"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
