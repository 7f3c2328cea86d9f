"""What a run is made of and where it is kept: the sweep spec and presets, prompts, workloads, the run folder.

Imports nothing else of the harness: every other folder builds on these.
"""
