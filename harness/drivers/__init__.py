"""What a command does with engines: a sweep (single requests and batch points), a workload replay, a Ray
cluster sweep; `session` holds the steps they all share (engine settings, warm-up, the effective-config check,
the environment record, stop signals).

Imports `harness.engine`, `harness.telemetry` and `harness.rundata`; never the CLI.
"""
