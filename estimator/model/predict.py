"""`estimate predict`: one request under one config, from a saved model (what the CLI prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from estimator.errors import EstimatorError
from estimator.model.estimator import LatencyEstimator
from estimator.model.meta import StrictModel

MAX_TOKENS = 262_144  # beyond any served context window; a larger ask is an input error, not work


class PredictSpec(StrictModel):
    """What `estimate predict` asks: one request under one config."""

    model: Path
    config: dict[str, int | float | str]
    text_tokens: int = Field(gt=0, le=MAX_TOKENS)
    new_tokens: int = Field(ge=1, le=MAX_TOKENS)
    text: str | None = None
    allow_unseen: bool = False


def predict_report(spec: PredictSpec) -> dict[str, Any]:
    """Prefill ms, decode ms per step (first/median/last, exact) and whole-request ms of one request."""
    est = LatencyEstimator.load(spec.model)
    config = est.complete_config(spec.config)
    if est.variant == "embedding" and spec.text is None:
        raise EstimatorError("this model uses the embedding variant: pass the prompt with --text")
    req = est.predict_request(config, spec.text_tokens, spec.new_tokens, spec.text, allow_unseen=spec.allow_unseen)
    steps = est.decode_positions(config, spec.text_tokens, spec.new_tokens, spec.text, allow_unseen=spec.allow_unseen)
    return {
        "model": str(spec.model),
        "variant": est.variant,
        "config": config,
        "text_tokens": spec.text_tokens,
        "new_tokens": spec.new_tokens,
        "prefill_ms": req.prefill_ms,
        "decode_steps": req.decode_steps,
        "decode_first_ms": float(steps[0]) if len(steps) else None,
        "decode_median_ms": float(np.median(steps)) if len(steps) else None,
        "decode_last_ms": float(steps[-1]) if len(steps) else None,
        "decode_ms_total": req.decode_ms_total,
        "decode_ms_total_exact": float(steps.sum()),
        "total_ms": req.total_ms,
        "warnings": list(req.warnings),
        "unseen": list(req.unseen),
    }
