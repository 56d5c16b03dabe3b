"""How much to measure: the quick profile (CI smoke, about a minute) and the full sweep.

The full profile takes about 35 minutes on a 2-vCPU machine (``python -m bench --dry-run``): 5
repeats of every configuration, with the fixed-rate mode measured at 2, 16 and 64 connections and
short-lived connections at 16 rather than the whole sweep; ``--repeats 3`` (about 21 minutes) and
the other flags override it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bench.topology import MODES


@dataclass(frozen=True)
class Profile:
    """Every knob of one benchmark run (see ``python -m bench --help``)."""

    name: str
    modes: tuple[str, ...] = tuple(MODES)
    connections: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    rate_connections: tuple[int, ...] = (2, 16, 64)
    rate_qps: int = 1000
    # Closed loop with one request per TCP connection (wrk with "Connection: close"): every
    # request pays a new connection, and with sockops on the pairing path of one.
    short_connections: tuple[int, ...] = (16,)
    repeats: int = 5
    warmup_s: float = 1.0
    seconds: float = 3.0
    payload: int = 1024
    envoy_workers: int = 2
    nginx_workers: int = 1
    wrk_threads: int = 2
    pingpong: bool = True
    pingpong_warmup: float = 1.0
    pingpong_seconds: float = 3.0
    sockperf: bool = True
    iperf3: bool = True
    # (mode, connections) whose closed-loop runs also get the "loaded" state: programs attached,
    # namespaces not enabled -- the cost sockops puts on pods that have not opted in.
    not_opted_in: tuple[str, int] | None = ("both", 16)
    # Shared machine: before a run wait up to quiet_timeout_s for other work to use at most
    # max_foreign_cpus; repeat a run (up to `retries` times) that other work disturbed more than
    # that. None: never wait or repeat. Both are recorded per run (attempts, waited_for_quiet_s).
    max_foreign_cpus: float | None = 0.3
    quiet_timeout_s: float = 10.0
    retries: int = 1
    quiet_budget_s: float = 180.0  # at most this much waiting and repeating per benchmark
    # Two extra runs (off, on) of "both" under perf record: where the CPU goes (bench/perfbreak.py).
    perf: bool = True
    perf_connections: int = 16
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def override(self, **changes: Any) -> Profile:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        modes=("baseline", "both"),
        connections=(16,),
        rate_connections=(),
        repeats=2,
        warmup_s=1.0,
        seconds=2.0,
        pingpong_warmup=0.5,
        pingpong_seconds=1.0,
        sockperf=False,
        iperf3=False,
        not_opted_in=None,
        perf=False,
        max_foreign_cpus=None,
    ),
    "full": Profile(name="full", repeats=5),
}
