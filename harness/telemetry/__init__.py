"""Device telemetry (clocks, power, temperature, throttle reasons): NVML or the host's counters, sampled in a
process of its own, and joined to the measured steps.

Imports no other folder of the harness.
"""
