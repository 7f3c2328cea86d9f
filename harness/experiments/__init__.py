"""Experiments on the real engine whose results are published (`profile experiment ...`): each drives one or more
engine starts through the harness's own request driver and keeps its raw rows, so its analysis can be rerun.
Estimator-side analysis, where an experiment needs one, runs as `estimate experiment ...` over those files: the
two halves still meet only through files and the contract."""
