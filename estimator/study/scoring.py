"""Predictions to show beside the measurements: a saved model on every row of some runs, and the held-out
predictions that `estimate compare` saved. The report renders these; it never predicts itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from estimator.data.runs import PHASES, RunSet
from estimator.errors import EstimatorError
from estimator.model.estimator import LatencyEstimator


@dataclass
class ModelOnRuns:
    """A saved model and its predictions (`predicted_ms`) beside `latency_ms` per phase, or why it could not
    predict (`error`). In-sample wherever the model was trained on these runs."""

    model_dir: Path
    estimator: LatencyEstimator
    frames: dict[str, pd.DataFrame] | None
    error: str | None = None


def score_model_on_runs(model_dir: Path, runset: RunSet, group: str | None) -> ModelOnRuns:
    """Load the model in `model_dir` and predict every row of `runset` (keeping `group` for colouring)."""
    est = LatencyEstimator.load(model_dir)
    frames: dict[str, pd.DataFrame] = {}
    try:
        for phase in PHASES:
            f = runset.phase(phase)
            if est.meta.variant == "embedding":
                f = runset.with_text(f)
            # measured rows: lengths or configs outside the model's training data are scored, not refused
            predict = est.predict_prefill if phase == "prefill" else est.predict_decode
            pred = predict(f, allow_unseen=True)
            keep = [c for c in (group, "latency_ms") if c and c in f.columns]
            frames[phase] = f[keep].assign(predicted_ms=pred)
    except EstimatorError as exc:
        return ModelOnRuns(model_dir, est, None, str(exc))
    return ModelOnRuns(model_dir, est, frames)


def held_out_predictions(compare_dir: Path | None, variant: str) -> pd.DataFrame | None:
    """`estimate compare`'s by-prompt test predictions of `variant` (None when there are none)."""
    if compare_dir is None or not (compare_dir / "predictions.parquet").is_file():
        return None
    preds = pd.read_parquet(compare_dir / "predictions.parquet")
    sel = preds[(preds["split"] == "by_prompt") & (preds["predictor"] == variant)]
    return sel if len(sel) else None
