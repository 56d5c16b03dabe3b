"""sockops: eBPF sockmap acceleration for service-mesh sidecars."""

__version__ = "0.1.0"
