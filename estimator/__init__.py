"""Latency estimator for LLM serving: learns prefill and per-position decode latency from harness runs.

A scheduler needs only `LatencyEstimator.load(path)` and its `predict_*` methods; the `estimate` CLI
(`estimator.cli`), the study (`estimator.study`), the report and the nightly job are separate packages
that this import never loads.
"""

from estimator.errors import EstimatorError
from estimator.model.estimator import LatencyEstimator, RequestPrediction

__all__ = ["EstimatorError", "LatencyEstimator", "RequestPrediction"]
