"""Bench: measure a live host with NVIDIA's aiperf, per profile (docs/bench.md).

The pure logic (workloads, aiperf's exports, /metrics samples, the report, the guide's
ladders, comparisons) lives in this package and imports neither pyinfra nor aiperf: aiperf
runs as a program from its own virtual environment (its pins conflict with ours, see
docs/bench.md), and ``run`` drives it.
"""

# The load generator, pinned: move it like any other pin (README, "Pins").
AIPERF_VERSION = "0.13.0"
