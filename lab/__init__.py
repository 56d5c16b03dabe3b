"""The test bed: Istio-style pods with a real Envoy, their cgroups, echo apps, a fake Kubernetes API.

Used by the demo, the benchmark and the tests alike; never by the agent (``sockops/``), and not in
the agent's image. It runs from a source checkout (``make setup`` puts the checkout on the venv's path).
"""
