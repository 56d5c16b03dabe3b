"""sockops beside other BPF users of the same hooks, on the real kernel.

Another tool's ``sock_ops`` program (tests/support/othertool.py: it counts established connections in
its own map) shares the test cgroup with sockops. What a user checks: the other tool keeps
seeing every connection whether it came before or after sockops, and through sockops' restart
and upgrade; sockops still accelerates, every byte intact (sha256); status and doctor name the
other program and say whether sharing is fine; sockops never replaces a program it cannot share
with; and a node that an older sockops attached with BPF_PROG_ATTACH moves to links.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEST_PREFIX, Plane
from support.agentproc import agents, sockops, wait_for
from support.othertool import NAME, OtherTool
from support.podtraffic import assert_intact, run_client, start_echo_server
from test_agent import Env, Transfer, _changed_programs, _spare_counter, accelerated_during, plain_pod

from lab.cgroups import Cgroup
from lab.podlab import Lab, Pod
from sockops import libbpf, links, netns
from sockops.errors import SockopsError

pytestmark = pytest.mark.kernel

CONNS, REQS, SIZES = 8, 50, (1, 1000, 65536)
SK_MSG_NAME = "sockops_redirect"[:15]  # the kernel keeps 15 characters of a program's name


@pytest.fixture
def other_tool(cgroup: Cgroup) -> Iterator[Callable[[str], OtherTool]]:
    """Factory: ``other_tool("multi" | "link" | "exclusive")`` attaches another tool's program
    to the test cgroup; teardown detaches and unloads it, also when the test fails."""
    made: list[OtherTool] = []

    def make(how: str) -> OtherTool:
        tool = OtherTool(cgroup.path, how)
        made.append(tool)
        return tool

    try:
        yield make
    finally:
        for tool in made:
            tool.close()


@pytest.fixture
def agent_env(cgroup: Cgroup, lab: Lab, tmp_path: Path) -> Iterator[Env]:
    """As test_agent's ``env``: agents of the test, stopped, detached and unpinned at the end."""
    import secrets

    bpffs = Path("/sys/fs/bpf") / f"{TEST_PREFIX}-coexist-{secrets.token_hex(4)}"
    with agents(cgroup.path, bpffs) as started:
        yield Env(cgroup, bpffs, lab, tmp_path, started)


def on_cgroup(cgroup: Path) -> list[int]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return libbpf.prog_query(fd, libbpf.BPF_CGROUP_SOCK_OPS)[0]
    finally:
        os.close(fd)


def traffic_seen_by_both(plane: Plane, pod: Pod, tool: OtherTool) -> None:
    """Echo traffic in an enabled pod: intact, accelerated by sockops, counted by the other tool."""
    seen, redirected = tool.established(), plane.counters()["redirected_bytes"]
    res = run_client(pod, "127.0.0.1", connections=CONNS, requests=REQS, sizes=SIZES)
    assert_intact(res, CONNS, REQS, SIZES)
    assert tool.established() - seen >= 2 * CONNS, "the other tool missed connections"
    assert plane.counters()["redirected_bytes"] - redirected >= res["bytes"], "sockops did not accelerate"


def loopback_pod(plane: Plane, lab: Lab, logs: Path) -> Pod:
    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    plane.enable(pod)
    start_echo_server(pod, logs, host="127.0.0.1")
    return pod


def sock_ops_hook(report: dict[str, object]) -> dict[str, object]:
    (hook,) = [h for h in report["hooks"] if h["kind"] == "sock_ops"]  # type: ignore[union-attr]
    return hook


# -- the data plane beside another tool ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_other_tool_attached_before_keeps_running(
    other_tool: Callable[[str], OtherTool], make_dataplane: Callable[..., Plane], lab: Lab, logs: Path
) -> None:
    """Another tool attached with BPF_F_ALLOW_MULTI first; sockops attaches beside it, both run,
    and status and doctor name it as a foreign program sharing a multi-attach hook: fine."""
    tool = other_tool("multi")
    plane = make_dataplane()
    assert tool.prog_id in on_cgroup(plane.cgroup)
    pod = loopback_pod(plane, lab, logs)
    traffic_seen_by_both(plane, pod, tool)

    res = sockops("status", "--json", "--bpffs", str(plane.bpffs_dir), "--cgroup", str(plane.cgroup))
    assert res.returncode == 0, res.stderr
    hook = sock_ops_hook(json.loads(res.stdout))
    owners = {p["name"]: p["owner"] for p in hook["programs"]}
    assert owners == {NAME: links.FOREIGN, "sockops_main": links.OURS}, hook
    assert hook["ok"] and hook["mode"] == "multi" and NAME in hook["verdict"], hook
    text = sockops("status", "--bpffs", str(plane.bpffs_dir), "--cgroup", str(plane.cgroup)).stdout
    assert f"{NAME} (id {tool.prog_id}, foreign)" in text and "fine" in text, text

    res = sockops("doctor", "--json", "--bpffs", str(plane.bpffs_dir), "--cgroup", str(plane.cgroup))
    assert res.returncode == 0, res.stdout + res.stderr
    probes = {p["name"]: p for p in json.loads(res.stdout)["probes"]}
    assert probes["hook_sock_ops"]["ok"] and NAME in probes["hook_sock_ops"]["detail"], probes
    assert probes["hook_sk_msg"]["ok"], probes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["multi", "link"])
def test_other_tool_attached_after_keeps_running(
    how: str, other_tool: Callable[[str], OtherTool], dataplane: Plane, lab: Lab, logs: Path
) -> None:
    """sockops first; another tool then attaches (BPF_F_ALLOW_MULTI, or its own link): the
    kernel lets it, and both programs see every connection."""
    tool = other_tool(how)
    progs = on_cgroup(dataplane.cgroup)
    assert tool.prog_id in progs and len(progs) == 2, progs
    pod = loopback_pod(dataplane, lab, logs)
    traffic_seen_by_both(dataplane, pod, tool)


@pytest.mark.timeout(120)
def test_exclusive_program_of_another_tool_is_never_replaced(
    other_tool: Callable[[str], OtherTool], make_dataplane: Callable[..., Plane], lab: Lab, logs: Path
) -> None:
    """A program attached exclusively (no BPF_F_ALLOW_MULTI) leaves no room for a link: sockops
    refuses with the fix in the message instead of replacing it, and doctor says why."""
    tool = other_tool("exclusive")
    with pytest.raises(SockopsError, match="BPF_F_ALLOW_MULTI") as exc:
        make_dataplane()
    assert isinstance(exc.value, libbpf.HookBusy), exc.value
    assert on_cgroup(tool.cgroup) == [tool.prog_id], "the other tool's program was replaced"

    pod = lab.add_pod("app", ip="10.244.1.10", sidecar=False)
    start_echo_server(pod, logs, host="127.0.0.1")
    seen = tool.established()
    assert_intact(run_client(pod, "127.0.0.1", connections=2, requests=5, sizes=SIZES), 2, 5, SIZES)
    assert tool.established() - seen >= 4

    res = sockops("doctor", "--json", "--cgroup", str(tool.cgroup))
    assert res.returncode == 1, res.stdout
    probe = {p["name"]: p for p in json.loads(res.stdout)["probes"]}["hook_sock_ops"]
    assert not probe["ok"] and NAME in probe["detail"] and "exclusive" in probe["detail"], probe
    assert "BPF_F_ALLOW_MULTI" in probe["fix"], probe


# -- the agent beside another tool ----------------------------------------------------------------------


def our_links(e: Env) -> dict[str, tuple[int, int]]:
    """Hook kind -> (link id, program id) of the links pinned under the agent's bpffs dir."""
    out = {}
    for att in links.ATTACHMENTS:
        pin = links.link_pin(e.bpffs, att)
        if not pin.exists():
            continue
        fd = libbpf.obj_get(pin)
        try:
            info = libbpf.link_info(fd)
        finally:
            os.close(fd)
        out[att.kind] = (info["id"], info["prog_id"])
    return out


def ours_and_others(e: Env) -> dict[str, list[str]]:
    return {kind: sorted(str(p["name"]) for p in progs) for kind, progs in e.attached().items()}


def counted_by_other(e: Env, pod: Pod, tool: OtherTool) -> None:
    seen = tool.established()
    Transfer(pod, seconds=0.3).assert_intact()
    wait_for(lambda: tool.established() - seen >= 4, 5, "the other tool to count 2 connections")


@pytest.mark.timeout(240)
def test_agent_restart_and_upgrade_keep_the_other_tool_and_swap_on_the_same_links(
    agent_env: Env, other_tool: Callable[[str], OtherTool], tmp_path: Path
) -> None:
    """Other tool first; then the agent, kill -9 and a restart, and an upgrade to changed
    programs, with one accelerated stream running through all of it: the other program stays
    attached and counting, sockops' links keep their ids while their programs change, the
    stream is intact."""
    env = agent_env
    tool = other_tool("multi")
    pod = plain_pod(env)
    args = ("--source", "static", "--netns", pod.netns)
    first = env.agent(*args).wait_ready()
    links_v1 = our_links(env)
    assert set(links_v1) == {"sock_ops", "sk_msg", "skb_egress"}, links_v1
    assert ours_and_others(env) == {
        "sock_ops": sorted([NAME, "sockops_main"]),
        "sk_msg": [SK_MSG_NAME],
        "skb_egress": ["sockops_synack"],
    }
    counted_by_other(env, pod, tool)

    stream = Transfer(pod, seconds=20.0)
    accelerated_during(env, pod, env.netns_stats(pod))
    first.kill9()
    env.agent(*args, name="restarted").wait_ready()
    assert {k: v[0] for k, v in our_links(env).items()} == {k: v[0] for k, v in links_v1.items()}
    assert ours_and_others(env)["sock_ops"] == sorted([NAME, "sockops_main"])
    counted_by_other(env, pod, tool)

    env.started[-1].stop()  # a rolling update: the old agent goes, the new one comes
    tags_v1 = {k: [p["tag"] for p in v] for k, v in env.attached().items()}
    v2 = env.agent(*args, env={"SOCKOPS_BPF_DIR": str(_changed_programs(tmp_path))}, name="v2")
    v2.wait_ready()
    assert stream.proc.poll() is None, "the stream ended before the upgrade: lengthen it"
    links_v2 = our_links(env)
    for kind, (link_id, prog_id) in links_v1.items():
        assert links_v2[kind][0] == link_id, f"{kind}: a new link instead of BPF_LINK_UPDATE"
        assert links_v2[kind][1] != prog_id, f"{kind}: the program was not replaced"
        fd = libbpf.link_fd_by_id(link_id)  # the very link of the first agent runs the new program
        try:
            assert libbpf.link_info(fd)["prog_id"] == links_v2[kind][1]
        finally:
            os.close(fd)
    assert [p["tag"] for p in env.attached()["sk_msg"]] != tags_v1["sk_msg"]
    assert ours_and_others(env)["sock_ops"] == sorted([NAME, "sockops_main"]), "attached twice, or lost"
    assert tool.prog_id in on_cgroup(env.cgroup.path)

    stream.assert_intact()
    counted_by_other(env, pod, tool)
    assert _spare_counter(env) > 0, "new connections do not run the upgraded sk_msg program"


@pytest.mark.timeout(180)
def test_old_style_attachment_is_moved_to_links(
    agent_env: Env, other_tool: Callable[[str], OtherTool]
) -> None:
    """A node as an older sockops left it: the maps pinned, sock_ops (and the SYN-ACK recorder)
    attached exclusively and sk_msg with BPF_PROG_ATTACH, an accelerated stream running. The new
    agent moves them to pinned links, the stream stays intact, and the cgroup hook is
    multi-attach again, so another tool can now attach beside it."""
    env = agent_env
    from bcc import BPF, BPFAttachType

    from sockops import layout, loader

    pod = plain_pod(env)
    old = loader.DataPlane.load(env.bpffs, loader.MapSizes())
    try:
        BPF.attach_func(old.sk_msg, old.bpf_map_fd(layout.MAP_SOCKHASH), BPFAttachType.SK_MSG_VERDICT)
        fd = os.open(env.cgroup.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            BPF.attach_func(old.programs["sockops_synack"], fd, BPFAttachType.CGROUP_INET_EGRESS)
            BPF.attach_func(old.sock_ops, fd, BPFAttachType.CGROUP_SOCK_OPS)
        finally:
            os.close(fd)
    finally:
        old.bpf.cleanup()  # type: ignore[attr-defined]  # an attachment outlives the process
    with env.maps() as m:
        m.enable(netns.cookie(pod.netns_path), netns.settings_for(pod.netns_path))
    assert not (env.bpffs / links.LINKS_DIR).exists()
    stream = Transfer(pod, seconds=8.0)
    accelerated_during(env, pod, env.netns_stats(pod))

    env.agent("--source", "static", "--netns", pod.netns).wait_ready()
    assert set(our_links(env)) == {"sock_ops", "sk_msg", "skb_egress"}
    assert ours_and_others(env) == {
        "sock_ops": ["sockops_main"],
        "sk_msg": [SK_MSG_NAME],
        "skb_egress": ["sockops_synack"],
    }
    owners = {k: [p["owner"] for p in v] for k, v in env.attached().items()}
    assert owners == {"sock_ops": [links.OURS], "sk_msg": [links.OURS], "skb_egress": [links.OURS]}, owners
    before = env.netns_stats(pod)
    Transfer(pod, seconds=0.5).assert_intact()
    assert env.netns_stats(pod)["redirected_bytes"] > before["redirected_bytes"], (
        "new connections not accelerated"
    )
    stream.assert_intact()

    tool = other_tool("multi")  # refused (EPERM) while the old exclusive attachment was there
    counted_by_other(env, pod, tool)


# -- the attachment table ----------------------------------------------------------------------------------


def test_every_program_has_its_own_pinned_link(dataplane: Plane) -> None:
    """Each entry of links.ATTACHMENTS (sk_msg on the sockhash; the SYN-ACK recorder and sock_ops
    on the cgroup) is attached through its own pinned link, reported as ours, swapped in place by
    a second agent's start, and detached with the others; so is the reader hook's raw tracepoint
    (sockops/reader_hook.py), which a second start replaces under the same pin."""
    from sockops import loader, reader_hook

    for att in links.ATTACHMENTS:
        assert att.program in dataplane.dp.programs
        assert links.link_pin(dataplane.bpffs_dir, att).exists()
        assert loader.programs_attached(dataplane.cgroup, dataplane.bpffs_dir)[att.kind] is True
        (prog,) = loader.attached_programs(dataplane.cgroup, dataplane.bpffs_dir)[att.kind]
        assert (prog["name"], prog["owner"]) == (att.kernel_name, links.OURS)
    assert reader_hook.attached(dataplane.bpffs_dir)  # the raw tracepoint, pinned beside them
    done = dataplane.dp.attach(dataplane.cgroup)  # a second agent's start
    assert done == {
        **dict.fromkeys((a.kind for a in links.ATTACHMENTS), "link updated"),
        "reader_hook": "link replaced",  # a raw tracepoint link has no BPF_LINK_UPDATE
    }
    assert reader_hook.attached(dataplane.bpffs_dir)
    off = dataplane.dp.attach(dataplane.cgroup, reader=False)  # SOCKOPS_READER_HOOK=off
    assert off["reader_hook"] == "off" and not reader_hook.attached(dataplane.bpffs_dir)
    loader.detach_all(dataplane.cgroup, dataplane.bpffs_dir)
    for att in links.ATTACHMENTS:
        assert loader.attached_programs(dataplane.cgroup, dataplane.bpffs_dir)[att.kind] == []
    assert not reader_hook.attached(dataplane.bpffs_dir)
    assert not reader_hook.link_pin(dataplane.bpffs_dir).exists()
