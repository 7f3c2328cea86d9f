"""Workload simulation: a replica of vLLM's v1 scheduler driven by the iteration model (docs/simulate.md)."""
