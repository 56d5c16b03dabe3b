"""Static source: network namespaces named on the command line are accelerated.

For hosts without an orchestrator and for tests. The names are re-reported at every resync, so a
namespace created after the agent started is picked up once it exists.
"""

from __future__ import annotations

import threading

from sockops.sources import Sink
from sockops.workload import Locator, Workload


class StaticSource:
    name = "static"

    def __init__(self, netns: list[str], interval: float = 30.0) -> None:
        self.netns = list(netns)
        self.interval = interval

    def workloads(self) -> list[Workload]:
        return [
            Workload(
                source=self.name,
                uid=n,
                namespace="",
                name=n,
                accelerate=True,
                reason="named with --netns",
                locator=Locator(netns=n),
            )
            for n in self.netns
        ]

    def run(self, sink: Sink, stop: threading.Event) -> None:
        sink.replace(self.name, self.workloads())
        stop.wait()
