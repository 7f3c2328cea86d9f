"""Traffic: the workload file formats and the arrival generator, shared by the harness (`profile workload`,
`profile replay`, `profile serve-bench`) and the estimator (`estimate simulate`).

Standard library only. The harness and the estimator still meet only through files: this package is the format
of one of those files, not a bridge between them.
"""
