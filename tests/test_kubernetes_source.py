"""The Kubernetes source against a fake API server (lab/kubeapi.py): no cluster, no BPF, fast.

Each test runs a real ``KubernetesSource`` with the official client, records what it tells its
sink, and waits for the sink's view of the node to become what the API says.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.recording_sink import RecordingSink

from lab.kubeapi import FakeKubeAPI, make_pod
from sockops.sources import Backoff
from sockops.sources.kubernetes import (
    KubeConfigMissing,
    KubernetesSource,
    NodeNameMissing,
    load_config,
    node_name_from_env,
)
from sockops.sources.objects import Malformed, pod_to_workload
from sockops.workload import (
    ANNOTATION,
    ISTIO_EXCLUDE_OUTBOUND_RANGES,
    ISTIO_INCLUDE_INBOUND_PORTS,
    ISTIO_INCLUDE_OUTBOUND_PORTS,
    NAMESPACE_LABEL,
    Locator,
    decide,
    parse_istio,
)

pytestmark = pytest.mark.timeout(60)

NODE = "node-a"
ON = {ANNOTATION: "true"}
OFF = {ANNOTATION: "false"}
NS_ON = {NAMESPACE_LABEL: "enabled"}


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as fake:
        fake.add_namespace("default")
        yield fake


class Runner:
    """A source running in a thread; ``stop()`` checks it returns in time."""

    def __init__(self, source: KubernetesSource, sink: RecordingSink) -> None:
        self.source, self.sink = source, sink
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=source.run, args=(sink, self.stop_event), daemon=True)
        self.thread.start()

    def stop(self, within: float = 2.0) -> float:
        t0 = time.monotonic()
        self.stop_event.set()
        self.thread.join(within + 1.0)
        took = time.monotonic() - t0
        assert not self.thread.is_alive(), f"run() did not return {within + 1.0}s after stop"
        return took


@pytest.fixture
def start(api: FakeKubeAPI) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def start_source(wait_synced: bool = True, **kw: Any) -> Runner:
        opts: dict[str, Any] = {
            "backoff_base": 0.02,
            "backoff_cap": 0.3,
            "auth_backoff": 0.2,
            "watch_timeout": 30,
            "request_timeout": 5.0,
            "namespace_wait": 2.0,
        }
        opts.update(kw)
        source = KubernetesSource(NODE, api_client=api.client(), **opts)
        runner = Runner(source, RecordingSink("kubernetes"))
        runners.append(runner)
        if wait_synced:
            runner.sink.wait_for(lambda s: s.replaces >= 1, "the first replace")
            api.wait_watching(2)
        return runner

    yield start_source
    for r in runners:
        r.stop()


# -- the view ------------------------------------------------------------------------------------


def test_preexisting_pods_are_picked_up(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("on", annotations=ON)
    api.add_pod("off", annotations=OFF)
    api.add_pod("plain")
    r = start()
    assert r.sink.calls[0][0] == "replace", "the first call is the whole view"
    r.sink.wait_view({"default/on": True, "default/off": False, "default/plain": False})
    w = r.sink.by_name()["default/on"]
    assert w.locator == Locator(pod_uid=w.uid) and w.reason == f"pod annotation {ANNOTATION}=true"
    assert r.sink.by_name()["default/plain"].reason == "not opted in"
    # the pod list is filtered by the server and watched from the list's version, with bookmarks
    pod_reqs = api.requests_of("pods")
    assert all(q.params.get("fieldSelector") == f"spec.nodeName={NODE}" for q in pod_reqs)
    watch = api.requests_of("pods", watch=True)[0]
    assert watch.params["allowWatchBookmarks"] == "true" and watch.params["resourceVersion"]


def test_annotation_on_off_on(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    uid = api.add_pod("web", annotations=ON)
    r = start()
    r.sink.wait_view({"default/web": True})
    api.update_pod(uid, annotations=OFF)
    r.sink.wait_view({"default/web": False})
    api.update_pod(uid, annotations=ON)
    r.sink.wait_view({"default/web": True})
    api.update_pod(uid, annotations={})
    r.sink.wait_view({"default/web": False})
    assert r.sink.replaces == 1 and not r.sink.errors


def test_namespace_default_with_pod_override(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_namespace("mesh", NS_ON)
    api.add_pod("a", "mesh")
    api.add_pod("b", "mesh", annotations=OFF)
    api.add_pod("c", "default")
    r = start()
    r.sink.wait_view({"mesh/a": True, "mesh/b": False, "default/c": False})
    assert r.sink.by_name()["mesh/a"].reason == f"namespace label {NAMESPACE_LABEL}=enabled"
    assert r.sink.by_name()["mesh/b"].reason == f"pod annotation {ANNOTATION}=false"


def test_namespace_label_change_live(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_namespace("mesh")
    api.add_pod("a", "mesh")
    api.add_pod("b", "mesh", annotations=OFF)
    api.add_pod("c", "default")
    r = start()
    r.sink.wait_view({"mesh/a": False, "mesh/b": False, "default/c": False})
    api.label_namespace("mesh", NS_ON)
    r.sink.wait_view({"mesh/a": True, "mesh/b": False, "default/c": False})
    api.label_namespace("mesh", {NAMESPACE_LABEL: "disabled"})
    r.sink.wait_view({"mesh/a": False, "mesh/b": False, "default/c": False})
    api.label_namespace("mesh", NS_ON)
    r.sink.wait_view({"mesh/a": True, "mesh/b": False, "default/c": False})
    api.delete_namespace("mesh")  # pods go soon after; until then: unlabelled
    r.sink.wait_view({"mesh/a": False, "mesh/b": False, "default/c": False})
    # only the pods whose decision changed were re-sent: c (other namespace) and b never
    upserts = [w.name for w in r.sink.messages("upsert")]
    assert upserts.count("a") == 4 and "b" not in upserts and "c" not in upserts


def test_pod_before_its_namespace(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("early", "late-ns")
    r = start()
    r.sink.wait_view({"late-ns/early": False})
    api.add_namespace("late-ns", NS_ON)
    r.sink.wait_view({"late-ns/early": True})


def test_pod_deleted_terminal_or_terminating(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    a = api.add_pod("a", annotations=ON)
    b = api.add_pod("b", annotations=ON)
    c = api.add_pod("c", annotations=ON)
    api.add_pod("done", annotations=ON, phase="Succeeded")
    r = start()
    r.sink.wait_view({"default/a": True, "default/b": True, "default/c": True})
    api.delete_pod(a)
    api.update_pod(b, phase="Failed")
    api.update_pod(c, deleting=True)
    r.sink.wait_view({})
    assert sorted(uid for kind, uid in r.sink.calls if kind == "delete") == sorted([a, b, c])


def test_node_filter(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("mine", annotations=ON)
    other = api.add_pod("theirs", node="node-b", annotations=ON)
    pending = api.add_pod("pending", node=None, annotations=ON)
    r = start()
    r.sink.wait_view({"default/mine": True})
    api.update_pod(other, annotations=OFF)
    api.add_pod("theirs-2", node="node-b", annotations=ON)
    api.update_pod(pending, node=NODE)  # scheduled here: appears
    r.sink.wait_view({"default/mine": True, "default/pending": True})
    time.sleep(0.2)
    assert "default/theirs" not in r.sink.by_name() and "default/theirs-2" not in r.sink.by_name()
    assert all("theirs" not in str(c) for c in r.sink.calls)


def test_sidecar_capture_and_invalid_values(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod(
        "istio",
        annotations={**ON, ISTIO_INCLUDE_INBOUND_PORTS: "8080,9090"},
        containers=("app", "istio-proxy"),
    )
    api.add_pod("native", annotations=ON, init_containers=("istio-init", "istio-proxy"))
    api.add_pod("status", annotations={**ON, "sidecar.istio.io/status": "{}"})
    api.add_pod("bad", annotations={ANNOTATION: "yes"})
    api.add_pod("badports", annotations={**ON, ISTIO_INCLUDE_OUTBOUND_PORTS: "80,http"})
    r = start()
    r.sink.wait_for(lambda s: len(s.view) == 5, "5 pods")
    v = r.sink.by_name()
    assert v["default/istio"].sidecar is True and v["default/istio"].capture.include_inbound_ports == (
        8080,
        9090,
    )
    assert v["default/native"].sidecar is True and v["default/status"].sidecar is True
    bad = v["default/bad"]
    assert not bad.accelerate and bad.reason == "invalid pod annotation"
    assert bad.sidecar is None and 'write "true" or "false"' in bad.errors[0]
    bp = v["default/badports"]
    assert bp.accelerate and "is not a port" in bp.errors[0] and bp.capture.include_outbound_ports is None


def test_host_network_pod_never_accelerated(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_namespace("mesh", NS_ON)
    api.add_pod("hostnet", "mesh", annotations=ON, host_network=True)
    api.add_pod("hostnet2", "mesh", host_network=True)
    r = start()
    r.sink.wait_view({"mesh/hostnet": False, "mesh/hostnet2": False})
    assert {w.reason for w in r.sink.view.values()} == {"host network"}


# -- failures --------------------------------------------------------------------------------------


def test_410_gone_relists(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    keep = api.add_pod("keep", annotations=ON)
    gone = api.add_pod("gone", annotations=ON)
    r = start()
    r.sink.wait_view({"default/keep": True, "default/gone": True})
    with api.paused():  # the source cannot reconnect while the world changes and history is lost
        api.drop_watches()
        api.delete_pod(gone)
        api.update_pod(keep, annotations=OFF)
        api.add_pod("new", annotations=ON)
        api.compact()
    r.sink.wait_for(lambda s: s.replaces >= 2, "a re-list")
    r.sink.wait_view({"default/keep": False, "default/new": True})
    r.sink.wait_for(lambda s: any("410" in x for x in s.restarts), "a restart for 410")
    # the re-list was the way out: the deleted pod went through replace, not a delete call
    assert gone not in [uid for kind, uid in r.sink.calls if kind == "delete"]


def test_410_as_http_status_and_expired_watch(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("a", annotations=ON)
    r = start()
    r.sink.wait_view({"default/a": True})
    with api.paused():
        api.drop_watches()
        api.add_pod("b", annotations=ON)
        api.compact(http=True)
    r.sink.wait_view({"default/a": True, "default/b": True})
    r.sink.wait_for(lambda s: s.replaces >= 2, "a re-list after HTTP 410")
    api.wait_watching(2)
    n = r.sink.replaces
    api.expire_watches()  # a 410 ERROR event on the open streams
    r.sink.wait_for(lambda s: s.replaces >= n + 1, "a re-list after an expired watch")
    assert not r.sink.errors


def test_dropped_watch_and_500s_reconnect_with_backoff(
    api: FakeKubeAPI, start: Callable[..., Runner]
) -> None:
    api.add_pod("a", annotations=ON)
    r = start(backoff_base=0.05, backoff_cap=1.0)
    r.sink.wait_view({"default/a": True})
    before = len(api.requests_of("pods", watch=True))
    api.fail_next(4, 500, resource="pods")
    api.drop_watches()
    b = api.add_pod("b", annotations=ON)  # while the source cannot watch
    api.update_pod(b, annotations=OFF)
    api.add_pod("c")
    r.sink.wait_view({"default/a": True, "default/b": False, "default/c": False})
    assert r.sink.replaces == 1, "the old version was still valid: re-watched, no re-list"
    assert any("500" in x for x in r.sink.restarts)
    attempts = api.requests_of("pods", watch=True)[before:]
    assert [q.status for q in attempts[:5]] == [500, 500, 500, 500, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts[:5])]
    # 0.05 * 2**n * [0.5, 1]: the last wait (>= 0.2 s) is longer than the first (<= 0.05 s + overhead)
    assert gaps[-1] > gaps[0] and gaps[-1] >= 0.2, gaps
    assert not r.sink.errors, "temporary errors are not user errors"


def test_api_outage_keeps_the_view(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    """Refused connections (server gone): nothing is deleted, the view recovers when it is back."""
    api.add_pod("a", annotations=ON)
    r = start(backoff_base=0.02, backoff_cap=0.1)
    r.sink.wait_view({"default/a": True})
    api.fail_next(10, 503)
    api.drop_watches()
    time.sleep(0.5)
    assert r.sink.accelerated() == {"default/a"} and not [c for c in r.sink.calls if c[0] == "delete"]
    api.add_pod("b", annotations=ON)
    r.sink.wait_view({"default/a": True, "default/b": True})


def test_connection_refused_outage(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    """The API server is down (connections refused) while pods change; then it is back."""
    a = api.add_pod("a", annotations=ON)
    r = start(backoff_base=0.02, backoff_cap=0.2)
    r.sink.wait_view({"default/a": True})
    with api.outage():
        api.update_pod(a, annotations=OFF)
        api.add_pod("b", annotations=ON)
        time.sleep(0.6)  # several refused reconnects, with backoff
        assert r.sink.accelerated() == {"default/a"}, "an outage changes nothing by itself"
    r.sink.wait_view({"default/a": False, "default/b": True})
    assert r.sink.restarts and all("connection" in x or "closed" in x for x in r.sink.restarts), (
        r.sink.restarts
    )
    assert r.sink.replaces == 1 and not r.sink.errors


def test_forbidden_is_reported_with_the_fix_and_retried(
    api: FakeKubeAPI, start: Callable[..., Runner]
) -> None:
    api.add_pod("a", annotations=ON)
    api.fail_next(2, 403, resource="pods")
    r = start(wait_synced=False)
    r.sink.wait_view({"default/a": True})
    msgs = [m for m, _ in r.sink.errors]
    assert len(msgs) == 2 and all("apply daemonset/rbac" in m and "403" in m for m in msgs), msgs


def test_namespaces_forbidden_pods_still_served(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    """RBAC without namespaces: pod annotations still work, namespace defaults do not (reported)."""
    api.add_namespace("mesh", NS_ON)
    api.add_pod("annotated", "mesh", annotations=ON)
    api.add_pod("by-label", "mesh")
    api.fail_next(1000, 403, resource="namespaces")
    r = start(wait_synced=False, namespace_wait=0.5, auth_backoff=0.2)
    r.sink.wait_view({"mesh/annotated": True, "mesh/by-label": False})
    r.sink.wait_for(lambda s: len(s.errors) >= 2, "errors for the namespace watch")
    assert all("namespaces" in m and "apply daemonset/rbac" in m for m, _ in r.sink.errors)
    api.clear_failures()
    r.sink.wait_view({"mesh/annotated": True, "mesh/by-label": True})


def test_bookmarks_advance_the_resource_version(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("a", annotations=ON)
    r = start()
    r.sink.wait_view({"default/a": True})
    for i in range(5):  # history the pod watch never saw: other resources move the version
        api.label_namespace("default", {"n": str(i)})
    rv = api.bookmark()
    r.sink.wait_for(lambda s: r.source.resource_versions["pods"] == str(rv), "the bookmark's version")
    api.compact()  # everything before the bookmark is gone...
    api.drop_watches()
    api.add_pod("b", annotations=ON)
    r.sink.wait_view({"default/a": True, "default/b": True})
    assert r.sink.replaces == 1, "...but the source re-watched from the bookmark, without a re-list"
    assert len(api.requests_of("pods", watch=False)) == 1


def test_malformed_objects_are_reported_and_skipped(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("a", annotations=ON)
    r = start()
    r.sink.wait_view({"default/a": True})
    api.emit_raw("pods", b'{"type": "ADDED", "object": {"metadata": ')
    api.emit_raw("pods", b"\xff\xfe not json")
    api.emit_raw("pods", b'["a list"]')
    api.emit_event("pods", "ADDED", {"kind": "Pod", "spec": {"nodeName": NODE}})  # no metadata
    api.emit_event("pods", "ADDED", "a string")
    api.emit_event("pods", "WHATEVER", make_pod("x"))
    api.emit_event("namespaces", "ADDED", {"metadata": {"labels": {}}})  # no name
    api.emit_event("namespaces", "MODIFIED", {"metadata": {"name": "default", "labels": ["x"]}})
    huge = make_pod("huge", annotations={**ON, "big": "x" * 300_000})
    api.emit_event("pods", "ADDED", huge)
    wrong = make_pod("wrong")
    wrong["metadata"]["annotations"] = {ANNOTATION: True}
    api.emit_event("pods", "ADDED", wrong)
    api.add_pod("after", annotations=ON)
    r.sink.wait_for(lambda s: "default/after" in s.by_name(), "the pod after the garbage")
    r.sink.wait_for(lambda s: len(s.errors) >= 10, "10 errors")
    v = r.sink.by_name()
    assert v["default/a"].accelerate and v["default/after"].accelerate
    # identity but unreadable content: reported, and not accelerated
    assert not v["default/huge"].accelerate and "limit" in v["default/huge"].errors[0]
    assert not v["default/wrong"].accelerate and v["default/wrong"].reason == "unreadable pod object"
    text = " | ".join(m for m, _ in r.sink.errors)
    for expected in ("malformed watch event", "no metadata", "unknown type", "labels", "not a map"):
        assert expected in text, (expected, text)
    assert r.sink.replaces == 1 and not r.sink.restarts, "a bad line does not restart the watch"


def test_malformed_list_items_are_skipped(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("a", annotations=ON)
    with api.cond:
        api.pods["bad"] = {"kind": "Pod", "metadata": {"name": 5}, "spec": {"nodeName": NODE}}
        api.namespaces["weird"] = {"metadata": {"name": "weird", "labels": "enabled"}}
    r = start()
    r.sink.wait_view({"default/a": True})
    text = " | ".join(m for m, _ in r.sink.errors)
    assert "skipped a pod in the list" in text and "weird" in text


def test_stop_returns_promptly_mid_watch(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("a", annotations=ON)
    r = start(watch_timeout=600)
    api.wait_watching(2)
    took = r.stop()
    assert took < 2.0, took
    n = len(r.sink.calls)
    api.add_pod("b", annotations=ON)
    time.sleep(0.2)
    assert len(r.sink.calls) == n, "no sink call after run() returned"


def test_stop_returns_promptly_while_requests_hang_or_back_off(
    api: FakeKubeAPI, start: Callable[..., Runner]
) -> None:
    api.pause()  # every request hangs unanswered
    r = start(wait_synced=False, request_timeout=30.0)
    time.sleep(0.3)
    assert r.stop() < 2.0
    api.resume()
    api.fail_next(100, 403)
    r2 = start(wait_synced=False, auth_backoff=60.0)
    r2.sink.wait_for(lambda s: len(s.errors) >= 1, "a 403")
    assert r2.stop() < 2.0


def test_server_watch_timeout_is_not_a_restart(api: FakeKubeAPI, start: Callable[..., Runner]) -> None:
    api.add_pod("a", annotations=ON)
    r = start(watch_timeout=1)
    time.sleep(2.5)
    api.add_pod("b", annotations=ON)
    r.sink.wait_view({"default/a": True, "default/b": True})
    assert len(api.requests_of("pods", watch=True)) >= 3
    assert r.sink.restarts == [] and r.sink.replaces == 1


# -- pure parts ------------------------------------------------------------------------------------


def test_pod_to_workload_rules() -> None:
    assert pod_to_workload(make_pod("x", phase="Failed"), None) is None
    with pytest.raises(Malformed):
        pod_to_workload({"metadata": {"name": "x", "namespace": "d"}}, None)  # no uid
    with pytest.raises(Malformed):
        pod_to_workload(["not", "a", "pod"], None)
    w = pod_to_workload(make_pod("x", "ns"), {NAMESPACE_LABEL: "maybe"})
    assert w is not None and not w.accelerate and w.reason == "invalid namespace label" and w.errors


def test_backoff_grows_with_jitter_and_caps() -> None:
    b = Backoff(base=0.5, cap=30.0)
    delays = [b.next() for _ in range(12)]
    for n, d in enumerate(delays):
        top = min(30.0, 0.5 * 2**n)
        assert top * 0.5 <= d <= top
    assert max(delays) <= 30.0
    b.reset()
    assert b.next() <= 0.5


def test_load_config(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    with pytest.raises(KubeConfigMissing, match="--kubeconfig"):
        load_config()
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "config"
    path.write_text(json.dumps(cfg))
    assert load_config(path).configuration.host == "http://127.0.0.1:1"
    assert load_config(f"{tmp_path}/missing:{path}").configuration.host == "http://127.0.0.1:1"
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/missing:{path}")
    assert load_config("").configuration.host == "http://127.0.0.1:1", "empty --kubeconfig: $KUBECONFIG"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeConfigMissing, match="ServiceAccount token"):
        load_config()  # no token file outside a pod


def test_node_name_from_env() -> None:
    assert node_name_from_env({"NODE_NAME": "n1"}) == "n1"
    assert node_name_from_env({"SOCKOPS_NODE_NAME": "n2", "NODE_NAME": "n1"}) == "n2"
    with pytest.raises(NodeNameMissing, match=r"fieldPath: spec\.nodeName"):
        node_name_from_env({"NODE_NAME": " "})


# -- fuzz ------------------------------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        ANNOTATION,
        ISTIO_INCLUDE_OUTBOUND_PORTS,
        ISTIO_INCLUDE_INBOUND_PORTS,
        ISTIO_EXCLUDE_OUTBOUND_RANGES,
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "sidecar.istio.io/status",
    ]
) | st.text(max_size=20)
_VALUES = st.text(max_size=80) | st.sampled_from(
    ["*", " * ", "true", "TRUE ", "enabled", "1,2,65535", "0", "²"]
)
_PORTISH = st.lists(st.text(alphabet="0123456789²٣ ,*-", max_size=6), max_size=5).map(",".join)
_MAPS = st.dictionaries(_KEYS, _VALUES | _PORTISH, max_size=6)


@settings(max_examples=400, deadline=None)
@given(_MAPS, st.dictionaries(st.just(NAMESPACE_LABEL) | st.text(max_size=10), _VALUES, max_size=3))
def test_decide_and_parse_istio_never_raise(annotations: dict[str, str], labels: dict[str, str]) -> None:
    d = decide(annotations, labels)
    assert isinstance(d.accelerate, bool) and d.reason
    assert (d.error is not None) == d.reason.startswith("invalid")
    capture, errors = parse_istio(annotations)
    assert all(isinstance(e, str) and e for e in errors)
    for ports in (capture.include_outbound_ports, capture.include_inbound_ports):
        assert ports is None or all(0 < p < 65536 for p in ports)
    w = pod_to_workload(make_pod("p", annotations=annotations), labels)
    assert w is not None and (
        not w.accelerate
        or annotations.get(ANNOTATION, "").strip().lower() == "true"
        or ANNOTATION not in annotations
    )
