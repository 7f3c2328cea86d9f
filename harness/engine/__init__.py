"""One real vLLM engine on one device: its settings and their checked exceptions, the device and CPU dtype it runs
on, CPU pinning, its log, stepping it, and stopping it (with a watchdog for when the harness dies).

Imports `harness.rundata` and `harness.telemetry` only.
"""
