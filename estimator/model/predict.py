"""`estimate predict`: one request under one config, from a saved model (what the CLI prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict, field_validator

from contract.request import Request
from estimator.errors import EstimatorError
from estimator.model.estimator import LatencyEstimator
from estimator.strict import StrictModel

MAX_TOKENS = 262_144  # beyond any served context window; a larger ask is an input error, not work


class PredictSpec(StrictModel):
    """What `estimate predict` asks: one request (the contract's: its prompt tokens and text, and the tokens it
    generates, `output_tokens`) under one config."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: Path
    config: dict[str, int | float | str]
    request: Request
    allow_unseen: bool = False

    @field_validator("request")
    @classmethod
    def _lengths(cls, r: Request) -> Request:
        if not 0 < r.text_tokens <= MAX_TOKENS:
            raise ValueError(f"text_tokens must be in 1..{MAX_TOKENS}, got {r.text_tokens}")
        if not 1 <= r.output_tokens <= MAX_TOKENS:
            raise ValueError(f"new_tokens must be in 1..{MAX_TOKENS}, got {r.output_tokens}")
        return r


def predict_report(spec: PredictSpec) -> dict[str, Any]:
    """Prefill ms, decode ms per step (first/median/last, exact) and whole-request ms of one request."""
    est = LatencyEstimator.load(spec.model)
    config = est.complete_config(spec.config)
    r = spec.request
    if est.variant == "embedding" and r.prompt is None:
        raise EstimatorError("this model uses the embedding variant: pass the prompt with --text")
    req = est.predict_request(config, r.text_tokens, r.output_tokens, r.prompt, allow_unseen=spec.allow_unseen)
    steps = est.decode_positions(config, r.text_tokens, r.output_tokens, r.prompt, allow_unseen=spec.allow_unseen)
    return {
        "model": str(spec.model),
        "variant": est.variant,
        "config": config,
        "text_tokens": r.text_tokens,
        "new_tokens": r.output_tokens,
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
