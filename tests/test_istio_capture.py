"""Istio's capture is found whichever iptables backend wrote it, and read once per pod.

istio-iptables writes with the legacy backend on some nodes; the image's nft ``iptables-save``
does not show those rules, and a pod's REDIRECT pairing was then silently off. Rules are written
here with Debian's ``iptables-legacy`` / ``iptables-nft`` inside test pods' namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_PREFIX
from support.agentproc import agents, sockops, wait_for
from test_agent import Env, plain_pod

from lab.cgroups import Cgroup
from lab.podlab import Lab, Pod
from sockops import netns

pytestmark = pytest.mark.kernel


@pytest.fixture
def lc(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[Env]:
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-cap-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        yield Env(cgroup, bpffs, lab, tmp_path, started)


def write_capture(pod: Pod, tool: str, out_port: int, in_port: int) -> None:
    for rule in (
        ["-t", "nat", "-N", "ISTIO_REDIRECT"],
        ["-t", "nat", "-A", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(out_port)],
        ["-t", "nat", "-N", "ISTIO_IN_REDIRECT"],
        ["-t", "nat", "-A", "ISTIO_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(in_port)],
    ):
        res = pod.run([tool, *rule], text=True)
        assert res.returncode == 0, res.stderr


def legacy_tables(pod: Pod) -> list[str]:
    res = pod.run(["cat", "/proc/net/ip_tables_names"], text=True)
    return res.stdout.split()


def test_capture_is_read_from_either_backend_without_creating_legacy_tables(lc: Env) -> None:
    nft = plain_pod(lc, "nft")
    write_capture(nft, "iptables-nft", 15101, 15106)
    legacy = lc.lab.add_pod("legacy", ip="10.244.3.11", sidecar=False)
    write_capture(legacy, "iptables-legacy", 15201, 15206)
    none = lc.lab.add_pod("none", ip="10.244.3.12", sidecar=False)

    assert netns.istio_capture(nft.netns_path) == netns.Capture(15101, 15106, "iptables-nft")
    assert netns.istio_capture(legacy.netns_path) == netns.Capture(15201, 15206, "iptables-legacy")
    assert netns.istio_capture(none.netns_path) is None
    assert "nat" not in legacy_tables(none), "looking for legacy rules created a legacy nat table"


def test_agent_pairs_and_reports_a_legacy_capture(lc: Env) -> None:
    pod = plain_pod(lc)
    write_capture(pod, "iptables-legacy", 15201, 15206)
    agent = lc.agent("--source", "static", "--netns", pod.netns).wait_ready()
    wait_for(lambda: agent.state().get(pod.netns, {}).get("state") == "accelerated", 10, "accelerated")
    with lc.maps() as m:
        conf = m.enabled()[netns.cookie(pod.netns_path)]
    assert (conf.sidecar, conf.capture_out, conf.capture_in) == (True, 15201, 15206)
    out = sockops("status", "--bpffs", str(lc.bpffs), "--state-file", str(agent.state_file)).stdout
    assert "Istio capture: iptables-legacy 15201/15206" in out, out
    doc = json.loads(
        sockops("status", "--json", "--bpffs", str(lc.bpffs), "--state-file", str(agent.state_file)).stdout
    )
    assert doc["workloads"][0]["capture"] == "iptables-legacy 15201/15206"


def test_resyncs_do_not_read_a_settled_pod_again(lc: Env, tmp_path: Path) -> None:
    """Count the agent's nsenter runs with a shim first on its PATH that logs and execs the real one."""
    pod = plain_pod(lc)
    write_capture(pod, "iptables-nft", 15001, 15006)
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    calls = tmp_path / "nsenter-calls"
    shim = shim_dir / "nsenter"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec /usr/bin/nsenter "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    agent = lc.agent(
        "--source", "static", "--netns", pod.netns, "--resync", "0.2",
        env={"PATH": f"{shim_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    agent.wait_ready()
    wait_for(lambda: agent.state().get(pod.netns, {}).get("capture"), 10, "the capture read")
    before = calls.read_text().count("\n")
    passes = agent.metric("sockops_reconciles_total", source="static") or 0
    wait_for(
        lambda: (agent.metric("sockops_reconciles_total", source="static") or 0) >= passes + 10,
        20,
        "ten more full resyncs",
    )
    time.sleep(0.3)
    assert calls.read_text().count("\n") == before, calls.read_text()
