"""What the resolver reads from inside a pod's namespace is cached per netns cookie.

A full resync used to run ``nsenter iptables-save`` for every accelerated pod every 30 s; the
capture rules and addresses of a pod do not change once istio-init and the CNI have run. These
tests drive the real Resolver with a counting capture reader and a test clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sockops import netns
from sockops.reconciler import SETTLE_SECONDS, Resolver
from sockops.workload import Locator, Workload, parse_istio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def workload(**kw: object) -> Workload:
    return Workload("kubernetes", "uid-1", "shop", "cart", True, "", Locator(pod_uid="uid-1"), **kw)  # type: ignore[arg-type]


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Resolver, Clock, dict[str, object]]:
    state: dict[str, object] = {"cookie": 7, "capture": netns.Capture(15001, 15006, "iptables-nft"),
                                "ips": ("10.244.0.5",), "reads": 0}  # fmt: skip

    def read_capture(path: Path) -> netns.Capture | None:
        state["reads"] = int(state["reads"]) + 1  # type: ignore[call-overload]
        return state["capture"]  # type: ignore[return-value]

    monkeypatch.setattr(netns, "cookie", lambda path: state["cookie"])
    monkeypatch.setattr(netns, "local_addresses", lambda path: state["ips"])
    clock = Clock()
    res = Resolver(read_capture=read_capture, clock=clock)
    monkeypatch.setattr(res, "path", lambda loc: tmp_path)
    return res, clock, state


def test_a_complete_read_is_not_repeated(setup: tuple[Resolver, Clock, dict[str, object]]) -> None:
    res, clock, state = setup
    first = res.resolve(workload(sidecar=True))
    assert first.capture == "iptables-nft 15001/15006" and first.settings.sidecar
    for _ in range(10):  # ten full resyncs, 30 s apart
        clock.now += 30
        assert res.resolve(workload(sidecar=True)) == first
    assert state["reads"] == 1


def test_changed_annotations_are_read_again(setup: tuple[Resolver, Clock, dict[str, object]]) -> None:
    res, _, state = setup
    res.resolve(workload(sidecar=True))
    capture, _ = parse_istio({"traffic.sidecar.istio.io/excludeOutboundPorts": "9090"})
    state["capture"] = netns.Capture(15001, 15006, "iptables-legacy")
    again = res.resolve(workload(sidecar=True, capture=capture))
    assert state["reads"] == 2 and again.capture == "iptables-legacy 15001/15006"


def test_an_incomplete_read_is_repeated_until_the_namespace_settles(
    setup: tuple[Resolver, Clock, dict[str, object]],
) -> None:
    """Seen before istio-init wrote the rules: read again at each resync, then trusted."""
    res, clock, state = setup
    state["capture"] = None
    assert res.resolve(workload()).capture is None
    clock.now += 30
    state["capture"] = netns.Capture(15001, 15006, "iptables-nft")
    assert res.resolve(workload()).capture == "iptables-nft 15001/15006"  # the rules appeared
    assert state["reads"] == 2

    state["cookie"] = 8  # a pod without a sidecar: nothing to find, trusted once settled
    state["capture"] = None
    reads = int(state["reads"])  # type: ignore[call-overload]
    for _ in range(int(SETTLE_SECONDS // 30) + 5):
        res.resolve(workload())
        clock.now += 30
    assert int(state["reads"]) - reads == int(SETTLE_SECONDS // 30)  # type: ignore[call-overload]


def test_namespaces_no_longer_wanted_are_forgotten(setup: tuple[Resolver, Clock, dict[str, object]]) -> None:
    res, _, state = setup
    res.resolve(workload(sidecar=True))
    res.retain(set())
    res.resolve(workload(sidecar=True))
    assert state["reads"] == 2
