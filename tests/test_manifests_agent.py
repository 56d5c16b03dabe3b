"""daemonset/ as issue 13 asks for it: nodes can opt out, and the grace period fits the stop.

Kept apart from tests/test_manifests.py (the build, schemas and privileges) and using its
builder, so these checks read what ``kubectl kustomize`` produces.
"""

from __future__ import annotations

from typing import Any

from test_manifests import agent_env, built, one

from sockops import agent, cli, config

OPT_OUT = {"sockops.io/agent": "disabled"}


def _term_matches(term: dict[str, Any], labels: dict[str, str]) -> bool:
    """One nodeSelectorTerm's matchExpressions against node labels (the operators used here)."""
    for e in term.get("matchExpressions", []):
        value = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and value not in e["values"]:
            return False
        if op == "NotIn" and value in e["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def schedulable(labels: dict[str, str]) -> bool:
    spec = one(built(), "DaemonSet")["spec"]["template"]["spec"]
    for key, want in spec.get("nodeSelector", {}).items():
        if labels.get(key) != want:
            return False
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return any(_term_matches(t, labels) for t in required["nodeSelectorTerms"])


def test_a_node_label_keeps_the_agent_off() -> None:
    linux = {"kubernetes.io/os": "linux"}
    assert schedulable(linux)
    assert schedulable({**linux, "sockops.io/agent": "enabled"})
    assert not schedulable({**linux, **OPT_OUT})


def test_grace_period_covers_the_stop_and_the_removal_drain() -> None:
    """A plain stop takes under agent.STOP_SECONDS; a removal drains for SOCKOPS_DRAIN_TIMEOUT
    after the uninstall mark's pause: the kubelet must not kill the agent before either ends."""
    objs = built()
    grace = one(objs, "DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = config.DRAIN_TIMEOUT.type(agent_env(objs)[config.DRAIN_TIMEOUT.env])
    assert grace >= drain + cli.AGENT_POLL_SECONDS + 2 * agent.STOP_SECONDS + 2
    assert grace <= 60, "a rollout does not wait for this, but a stuck removal should not hang for long"
