"""What the tests share: agents run as processes, docker engines, traffic in pods, scrapes, alerts.

The ``*_client.py``, ``*_peer.py``, ``pair_traffic.py``, ``pod_packets.py`` and ``socket_kinds.py``
modules are also programs the tests run inside pods, as files: they import nothing from here.
"""
