"""Latency estimator for LLM serving: learns prefill and per-position decode latency from harness runs.

A scheduler needs only `LatencyEstimator.load(path)` and its `predict_*` methods; the `estimate` CLI
(`estimator.cli`) and the experiments (`analyze`, `compare`) are separate modules.
"""

from estimator.errors import EstimatorError
from estimator.model import LatencyEstimator, RequestPrediction

__all__ = ["EstimatorError", "LatencyEstimator", "RequestPrediction"]
