"""The `sockops` command: doctor, agent, enable/disable, status, uninstall, demo.

Every flag has an environment-variable default (shown in --help), so the same settings work on a
command line and in a DaemonSet's env.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from types import ModuleType

from sockops import __version__, breaker, config, layout, loader, logs, observe
from sockops import netns as netns_mod
from sockops.errors import SockopsError

log = logging.getLogger("sockops")

AGENT_POLL_SECONDS = 2.0  # > the agent's 1 s check for an uninstall mark

EPILOG = """examples:
  sockops doctor                      can acceleration run here?
  sockops agent --source static --netns pod-a
                                      load, attach, accelerate the namespace pod-a
  sockops enable --netns pod-b        opt another namespace in while the agent runs
  sockops status --json               sockets, redirected bytes, misses, per namespace
  sockops uninstall                   stop new acceleration, drain, detach, unpin
  sockops demo                        an Istio-style pod with Envoy, off then on
"""


def _common(p: argparse.ArgumentParser) -> None:
    config.BPFFS.add_to(p)
    config.LOG_FORMAT.add_to(p)
    config.LOG_LEVEL.add_to(p)


def _sizes(p: argparse.ArgumentParser) -> None:
    for setting in config.SIZES:
        setting.add_to(p)


def _target(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--netns", help="network namespace name (ip netns) or path, e.g. /proc/PID/ns/net")
    g.add_argument("--pid", type=int, help="a process inside the pod")
    p.add_argument(
        "--sidecar",
        choices=("auto", "yes", "no"),
        default="auto",
        help="Istio sidecar capture: auto reads the namespace's nat rules (default auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = config.SettingsParser(
        prog="sockops",
        description="eBPF sockmap acceleration for service-mesh sidecars.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sockops {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("doctor", help="probe kernel features; exit 0 only where acceleration can run")
    d.add_argument("--json", action="store_true")
    d.add_argument("--cgroup", type=Path, default=None)
    config.BPFFS.add_to(d)

    a = sub.add_parser("agent", help="load and attach the programs, reconcile pods until SIGTERM")
    _common(a)
    _sizes(a)
    for setting in (*config.AGENT, *config.GUARD):
        setting.add_to(a)
    config.STATE_FILE.add_to(a)
    config.DRAIN_TIMEOUT.add_to(a)
    a.add_argument("--print-program", action="store_true", help="print the generated BPF C and exit")

    for name, helptext in (
        ("enable", "opt a network namespace in (new connections are accelerated)"),
        ("disable", "opt a network namespace out (live connections keep running)"),
    ):
        e = sub.add_parser(name, help=helptext)
        _common(e)
        _target(e)

    s = sub.add_parser(
        "status", help="workloads and why, enabled namespaces, sockets, counters, programs on the hooks"
    )
    _common(s)
    config.STATE_FILE.add_to(s)
    config.CGROUP.add_to(s)
    s.add_argument("--json", action="store_true")

    u = sub.add_parser("uninstall", help="stop accelerating, wait for accelerated connections, detach, unpin")
    _common(u)
    config.CGROUP.add_to(u)
    config.DRAIN_TIMEOUT.add_to(u)

    m = sub.add_parser("demo", help="Istio-style pod with Envoy: traffic with acceleration off, then on")
    m.add_argument("--connections", type=int, default=4)
    m.add_argument("--seconds", type=float, default=5.0, help="load duration per phase")
    m.add_argument("--size", type=int, default=1024, help="request size in bytes")
    # Listed here for --help only: main() hands everything after "bench" to bench's own parser.
    sub.add_parser("bench", add_help=False, help="Envoy mesh benchmark, sockops off vs on (bench --help)")
    return p


def _settings(args: argparse.Namespace, path: Path) -> layout.NetnsSettings:
    sidecar = {"auto": None, "yes": True, "no": False}[args.sidecar]
    return netns_mod.settings_for(path, sidecar)


def cmd_doctor(args: argparse.Namespace) -> int:
    from sockops import doctor

    probes = doctor.probe_all(cgroup=args.cgroup, bpffs_dir=args.bpffs)
    print(doctor.render(probes, args.json))
    return 0 if doctor.verdict(probes) else 1


def cmd_enable(args: argparse.Namespace, on: bool) -> int:
    path = netns_mod.resolve(args.netns, args.pid)
    cookie = netns_mod.cookie(path)
    with loader.PinnedMaps(args.bpffs) as maps:
        if on:
            settings = _settings(args, path)
            maps.enable(cookie, settings)
            log.info(
                "enabled",
                extra={"fields": {"netns": str(path), "cookie": cookie, "sidecar": settings.sidecar}},
            )
        else:
            maps.disable(cookie)
            log.info("disabled", extra={"fields": {"netns": str(path), "cookie": cookie}})
    return 0


def _netns_names() -> dict[int, str]:
    """Cookie -> name for the namespaces `ip netns` knows, to make status readable."""
    names = {}
    if netns_mod.NETNS_RUN_DIR.is_dir():
        for entry in netns_mod.NETNS_RUN_DIR.iterdir():
            try:
                names[netns_mod.cookie(entry)] = entry.name
            except (SockopsError, OSError):
                continue
    return names


def status_report(
    bpffs: Path, state_file: Path | None = None, cgroup: Path | None = None
) -> dict[str, object]:
    from sockops import links
    from sockops.cgroups import find_cgroup2_root
    from sockops.reconciler import read_state

    workloads = read_state(state_file) if state_file else None
    with loader.PinnedMaps(bpffs) as maps:
        counters = maps.counters()
        enabled = maps.enabled()
        stats = maps.netns_stats()
        anomalies = maps.anomalies()
        sockets = maps.sockets()
        pending = maps.pending()
    names = _netns_names()
    return {
        "sockets_active": len(sockets),
        "pending_connections": len(pending),
        "redirected_bytes": counters["redirected_bytes"],
        "redirected_messages": counters["redirected_messages"],
        "redirect_misses": counters["redirect_misses"],
        "enabled_netns": [
            {
                "cookie": c,
                "name": names.get(c),
                "sidecar": s.sidecar,
                "capture_ports": [s.capture_out, s.capture_in],
                "local_ips": list(s.local_ips),
                **stats.get(c, {}),
                "anomalies": anomalies[c].counts if c in anomalies else {},
            }
            for c, s in sorted(enabled.items())
        ],
        "counters": counters,
        # What the agent decided for each pod and why (None: no agent has published a state file).
        "workloads": workloads,
        # Every program on the hooks sockops uses, whose it is, and whether they can share it.
        "hooks": [h.to_dict() for h in links.hooks(cgroup or find_cgroup2_root(), bpffs)],
    }


def cmd_status(args: argparse.Namespace) -> int:
    report = status_report(args.bpffs, args.state_file, args.cgroup)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"sockets in the sockhash: {report['sockets_active']}   "
        f"waiting for a peer: {report['pending_connections']}"
    )
    print(
        f"redirected: {report['redirected_bytes']} bytes in {report['redirected_messages']} messages, "
        f"misses {report['redirect_misses']}"
    )
    workloads = report["workloads"]
    if workloads is not None:
        print("workloads:")
        for w in workloads:
            who = f"{w['namespace']}/{w['name']}" if w["namespace"] else w["name"]
            print(f"  {who:<36} {w['state']:<12} {w['reason']}")
            if w.get("capture"):
                print(f"  {'':<36} {'':<12} Istio capture: {w['capture']}")
            for err in w["errors"]:
                print(f"  {'':<36} {'':<12} ! {err}")
            if w.get("state") == "observing":
                for line in observe.render(w.get("observed")):
                    print(f"  {'':<36} {'':<12} {line}")
            if w.get("breaker"):
                print(f"  {'':<36} {'':<12} {breaker.render(w['breaker'])}")
        if not workloads:
            print("  (none reported by the sources)")
    print("enabled namespaces:")
    for ns in report["enabled_netns"]:
        print(
            f"  {ns['name'] or '-':<20} cookie={ns['cookie']:<8} "
            f"sidecar={'yes' if ns['sidecar'] else 'no':<3} "
            f"redirected_bytes={ns.get('redirected_bytes', 0)} misses={ns.get('misses', 0)}"
            + "".join(f" {k}={v}" for k, v in ns.get("anomalies", {}).items() if v)
        )
    if not report["enabled_netns"]:
        print("  (none)")
    print("counters:")
    for k, v in report["counters"].items():
        print(f"  {k:<28} {v}")
    print("programs on the hooks:")
    for hook in report["hooks"]:
        progs = ", ".join(f"{p['name']} (id {p['id']}, {p['owner']})" for p in hook["programs"])
        print(f"  {hook['kind']:<12} {hook['mode'] or '-':<9} {progs or '(none)'}")
        print(f"  {'':<12} {'':<9} {'' if hook['ok'] else '! '}{hook['verdict']}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from sockops import agent

    if args.print_program:
        print(loader.program_text())
        return 0
    return agent.run(config.AgentConfig.from_namespace(args))


def uninstall(
    bpffs: Path, cgroup: Path, drain_timeout: float, pause: float = AGENT_POLL_SECONDS
) -> dict[str, object]:
    """Stop new acceleration, wait for accelerated connections to close, then detach and unpin.

    Removing a socket from its last map purges unread data, so the maps are only unpinned once
    the sockhash is empty or the timeout has passed; even then, unpinning leaves live sockets in
    the (now unnamed) map until they close, so nothing is purged.
    """
    drained = True
    remaining = 0
    if (bpffs / layout.MAP_SOCKHASH).exists():
        with loader.PinnedMaps(bpffs) as maps:
            # Running agents poll for the mark every second and stop writing before we disable.
            maps.mark_uninstalling()
            time.sleep(pause)
            for cookie in list(maps.enabled()):
                maps.disable(cookie)
            deadline = time.monotonic() + drain_timeout
            while (remaining := len(maps.sockets())) and time.monotonic() < deadline:
                time.sleep(0.2)
            drained = remaining == 0
    loader.detach_all(cgroup, bpffs)
    loader.unpin(bpffs)
    return {"drained": drained, "sockets_left": remaining}


def cmd_uninstall(args: argparse.Namespace) -> int:
    from sockops.cgroups import find_cgroup2_root

    result = uninstall(args.bpffs, args.cgroup or find_cgroup2_root(), args.drain_timeout)
    if result["drained"]:
        log.info("uninstalled", extra={"fields": result})
    else:
        log.warning(
            "uninstalled after drain timeout; live connections keep their sockets until they close",
            extra={"fields": result},
        )
    return 0


def _from_checkout(module: str, command: str) -> ModuleType:
    """Import the demo or the bench, which live beside the agent in the source checkout only.

    The agent's image carries the agent alone (no lab, bench or tests), so there these commands
    explain where to run them instead of failing with an import traceback.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in (module, module.split(".")[0]):
            raise
        raise SockopsError(
            f"`{command}` needs the source checkout (its {module.split('.')[0]}/ package is not "
            "installed with the agent): run it from a clone after `make setup`, as `.venv/bin/{command}`"
        ) from e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        try:
            bench_main = _from_checkout("bench.__main__", "sockops bench").main
        except SockopsError as e:
            logs.setup("text", "info")
            log.error(str(e))
            return 2
        return bench_main(argv[1:], prog="sockops bench")
    args = build_parser().parse_args(argv)
    logs.setup(getattr(args, "log_format", None) or "text", getattr(args, "log_level", None) or "info")
    try:
        if args.cmd == "doctor":
            return cmd_doctor(args)
        if args.cmd == "agent":
            return cmd_agent(args)
        if args.cmd in ("enable", "disable"):
            return cmd_enable(args, args.cmd == "enable")
        if args.cmd == "status":
            return cmd_status(args)
        if args.cmd == "uninstall":
            return cmd_uninstall(args)
        if args.cmd == "demo":
            return _from_checkout("lab.demo", "sockops demo").run(args)
    except SockopsError as e:
        log.error(str(e))
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
