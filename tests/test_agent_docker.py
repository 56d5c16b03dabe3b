"""The agent with ``--source docker`` on the real kernel and a real dockerd.

A labelled container's own traffic is accelerated once the agent has seen it start, and its
entry goes when the container dies; an unlabelled container is never touched.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PREFIX
from support.agentproc import AgentProcess, agents, wait_for
from support.dockerd import Containers, DockerEngine
from test_docker_source import ECHO, LABEL_ON

from sockops import loader, netns

pytestmark = pytest.mark.kernel


@pytest.fixture
def docker_agent(docker_engine: DockerEngine, cgroup: Any, tmp_path: Path) -> Iterator[AgentProcess]:
    if docker_engine.cgroup_driver() != "cgroupfs":
        pytest.skip("needs the cgroupfs driver to place containers below the test cgroup")
    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-docker-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        a = AgentProcess(
            cgroup.path, bpffs, tmp_path, ["--source", "docker"], env={"DOCKER_HOST": docker_engine.host}
        )
        started.append(a)
        yield a.wait_ready()


def test_labelled_container_accelerated_until_it_dies(
    docker_agent: AgentProcess, containers: Containers, cgroup: Any
) -> None:
    bpffs = Path(docker_agent.argv[docker_agent.argv.index("--bpffs") + 1])
    parent = f"/{cgroup.path.name}"
    on = containers.run(labels=(LABEL_ON,), cgroup_parent=parent)
    off = containers.run(cgroup_parent=parent)
    pid_on = containers.inspect(on)["State"]["Pid"]
    pid_off = containers.inspect(off)["State"]["Pid"]
    cookie_on = netns.cookie(Path(f"/proc/{pid_on}/ns/net"))
    cookie_off = netns.cookie(Path(f"/proc/{pid_off}/ns/net"))

    def enabled() -> set[int]:
        with loader.PinnedMaps(bpffs) as m:
            return set(m.enabled())

    wait_for(lambda: cookie_on in enabled(), 20, "the labelled container to be enabled")
    assert cookie_off not in enabled()

    res = containers.engine.cli("exec", on, "sh", "-c", ECHO, timeout=120)
    assert [int(x) for x in res.stdout.split()] == [65536] * 20, res.stderr
    with loader.PinnedMaps(bpffs) as m:
        assert m.netns_stats()[cookie_on]["redirected_bytes"] >= 20 * 65536
    assert docker_agent.metric("sockops_pods_accelerated") == 1

    containers.engine.cli("rm", "-f", on, timeout=60)
    wait_for(lambda: cookie_on not in enabled(), 20, "the dead container's entry to go")
