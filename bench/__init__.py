"""Benchmarks of the gateway against real and fake upstreams; run from the repository root.

.venv/bin/python -m bench.overhead
"""
