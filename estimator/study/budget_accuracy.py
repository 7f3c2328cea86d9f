"""The budgeted default sweep against the full grid, on a held-out run neither model saw (issue: the main job in
minutes). Both models are `tokens` estimators (`estimate train --variant tokens`); the held-out run is measured in
its own engine starts, at lengths neither sweep measured.

Figures, per phase and for a whole request (prefill + every decode step, the latency a scheduler plans with):
MAPE of each model on the same held-out rows, and the ratio budgeted ÷ full with a paired bootstrap 95% interval
that resamples the held-out prompts (a prompt's rows stay together). The verdicts of `estimate compare` on the two
training runs are set side by side: each phase's sufficiency reading and the embedding answer.

**The level.** A model carries the level of the run it was trained on; a held-out run measured minutes later, on
other engine starts, sits at its own level (on a shared 2-core CPU the same configs moved 15-23% between runs).
So the raw ratio compares two training runs' levels as much as two designs, and its prompt-bootstrap interval
does not cover that. `level_removed` scores the curve's shape: per held-out engine start and per model, the
predictions are divided by that model's median predicted ÷ measured on that start (the level a calibration on
the running engine supplies), then scored the same way (the factors are fixed before the resampling).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import load_runs
from estimator.errors import EstimatorError
from estimator.model.estimator import LatencyEstimator

RESAMPLES = 2000


def _ape_frame(model: LatencyEstimator, heldout: pd.DataFrame) -> pd.DataFrame:
    out = heldout.copy()
    pre = out.phase == "prefill"
    out["predicted_ms"] = np.nan
    out.loc[pre, "predicted_ms"] = model.predict_prefill(out[pre], allow_unseen=True)
    out.loc[~pre, "predicted_ms"] = model.predict_decode(out[~pre], allow_unseen=True)
    return out


def _mape(measured: np.ndarray, predicted: np.ndarray) -> float:
    return float(100 * np.mean(np.abs(predicted - measured) / measured))


def _units(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """Rows to score for `what` (prefill, decode or request), with their prompt for the resampling."""
    if what in ("prefill", "decode"):
        f = frame[frame.phase == what]
        return pd.DataFrame({"prompt_id": f.prompt_id.to_numpy(), "start": f.start.to_numpy(),
                             "measured": f.latency_ms.to_numpy(), "a": f.a.to_numpy(), "b": f.b.to_numpy()})
    g = frame.groupby(["start", "point_id", "rep"])
    return pd.DataFrame({"prompt_id": g.prompt_id.first(), "start": g.start.first(), "measured": g.latency_ms.sum(),
                         "a": g.a.sum(), "b": g.b.sum()}).reset_index(drop=True)


def _level_removed(u: pd.DataFrame) -> pd.DataFrame:
    """`u` with each model's predictions divided by its median predicted ÷ measured per held-out engine start."""
    out = u.copy()
    for col in ("a", "b"):
        level = (u[col] / u.measured).groupby(u.start).transform("median")
        out[col] = u[col] / level
    return out


def _score(u: pd.DataFrame, rng: np.random.Generator) -> dict[str, Any]:
    """Both MAPEs and their ratio with the paired prompt-bootstrap 95% interval."""
    prompts = u.prompt_id.unique()
    idx = {p: np.flatnonzero(u.prompt_id.to_numpy() == p) for p in prompts}
    ma, mb = _mape(u.measured.to_numpy(), u.a.to_numpy()), _mape(u.measured.to_numpy(), u.b.to_numpy())
    ratios = []
    for _ in range(RESAMPLES):
        pick = np.concatenate([idx[p] for p in rng.choice(prompts, len(prompts))])
        s = u.iloc[pick]
        ratios.append(_mape(s.measured.to_numpy(), s.a.to_numpy()) / _mape(s.measured.to_numpy(), s.b.to_numpy()))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"adaptive_mape": round(ma, 3), "full_mape": round(mb, 3), "ratio": round(ma / mb, 4),
            "ratio_ci": [round(float(lo), 4), round(float(hi), 4)], "units": len(u), "prompts": len(prompts)}


def compare_on_heldout(adaptive_model: Path, full_model: Path, heldout: list[Path], seed: int = 0) -> dict[str, Any]:
    """MAPE of both models on the held-out rows, and budgeted ÷ full with its paired prompt-bootstrap interval."""
    runs = load_runs(heldout)
    rows = runs.samples[runs.samples.phase.isin(["prefill", "decode"])].reset_index(drop=True)
    a = _ape_frame(LatencyEstimator.load(adaptive_model), rows)
    b = _ape_frame(LatencyEstimator.load(full_model), rows)
    frame = rows.assign(a=a.predicted_ms.to_numpy(), b=b.predicted_ms.to_numpy(),
                        start=rows.run_id.astype(str) + "/" + rows.engine_config_id.astype(str))
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    shape: dict[str, Any] = {}
    for what in ("request", "prefill", "decode"):
        u = _units(frame, what)
        out[what] = _score(u, rng)
        shape[what] = _score(_level_removed(u), rng)
    return {**out["request"], "unit": "request (prefill + every decode step)", "by_phase": out,
            "level_removed": {**shape["request"], "by_phase": shape, "starts": int(frame.start.nunique())},
            "interval": "paired bootstrap over held-out prompts; the level of each training run is not resampled",
            "heldout_rows": len(rows), "resamples": RESAMPLES}


_READING = re.compile(r"\): (worth it|not worth it|undecided)")


def verdict_readings(compare_json: Path) -> dict[str, str]:
    """The verdict's decisive readings from a compare.json: each phase's sufficiency and the embedding answer."""
    try:
        verdict = json.loads(compare_json.read_text())["verdict"]
    except (OSError, ValueError, KeyError) as e:
        raise EstimatorError(f"{compare_json}: not an `estimate compare` result ({e})") from None
    out = {f"{phase} sufficiency": v["reading"] for phase, v in verdict["sufficiency"].items()}
    for line in verdict.get("embedding_answer", []):
        m = _READING.search(line)
        phase = line.split("(", 1)[1].split(")", 1)[0]
        out[f"{phase} embedding"] = m.group(1) if m else "?"
    return out
