"""Calibration on the running server: what an offline model cannot know, fitted on one observed window of it.

A served load (`profile serve-bench`, one `loads/<i>/`: the client's per-request results) gives, for the server start
it ran on:
- `level`: this start's speed as a ratio to the iteration model (every predicted iteration times `level`). On a
  shared CPU it moves from start to start and minute to minute (docs/simulate.md); only the server can tell it.
- `frontend_request_ms`, `frontend_token_ms`: the API server's own work per request (parse, tokenize) and per
  streamed token (detokenize, stream), as a FIFO queue on one CPU (estimator/sim/scheduler.py `Frontend`).

The fit: for each (per-request, per-token) pair on a grid (refined around its best point), the level that makes the
simulated mean TPOT equal the measured one (a bracketed secant: mean TPOT grows with the level); the pair whose
simulation has the lowest mean of per-request TTFT and end-to-end MAPE wins. A calibration replaces the
`serving.json` overheads (`--fit-overheads`, `--gap-overheads`): it is one way to give them, fitted on the server
being predicted, and it carries the engine limits and the config, so `estimate simulate --calibration CAL` needs
neither `--engine` nor `--config`.

`follow_level` re-fits the level alone on the newest client results (the front end's costs kept): following the
server as it moves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from contract.manifest import utc_now
from contract.request import Request
from estimator.errors import EstimatorError, one_line_validation_error
from estimator.model.iteration import IterationEstimator
from estimator.sim.measured import MeasuredRun, paired
from estimator.sim.scheduler import EngineConfig, Frontend
from estimator.sim.workload import Overheads, run_workload
from estimator.strict import StrictModel

CALIBRATION_FILE = "calibration.json"
MIN_WINDOW_S = 30.0  # shorter windows are refused: too few requests to tell the front end from the level
LEVEL_RANGE = (0.1, 10.0)


class Calibration(StrictModel):
    """One server start's calibration (saved as CAL/calibration.json)."""

    model: str  # the iteration model's folder
    run: str  # the serve-bench run and load it was fitted on
    load: int
    config: dict[str, Any]  # the model config it predicts (tier, dtype, ...)
    engine: dict[str, Any]  # the replica's EngineConfig fields (engine limits and policy)
    level: float  # iteration times x level
    frontend_request_ms: float
    frontend_token_ms: float
    window_s: float  # the client results' span it was fitted on
    window_start_s: float = 0.0  # on the load's clock
    requests: int
    fit: dict[str, Any]
    created_at: str

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.engine)

    def frontend(self) -> Frontend:
        return Frontend(self.frontend_request_ms, self.frontend_token_ms)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (CALIBRATION_FILE + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=1) + "\n")
        os.replace(tmp, folder / CALIBRATION_FILE)
        return folder / CALIBRATION_FILE

    @classmethod
    def read(cls, path: Path) -> Calibration:
        """CAL (a folder with calibration.json, or the file itself); EstimatorError (one line) if unreadable."""
        f = path / CALIBRATION_FILE if path.is_dir() else path
        if not f.is_file():
            raise EstimatorError(f"{path}: no {CALIBRATION_FILE} (make one with estimate calibrate MODEL RUN --load i)")
        try:
            cal = cls.model_validate_json(f.read_text())
        except ValidationError as exc:
            raise EstimatorError(f"{f}: {one_line_validation_error(exc)}") from None
        except (OSError, ValueError) as exc:
            raise EstimatorError(f"{f}: unreadable calibration ({exc})") from None
        if not (cal.level > 0 and cal.frontend_request_ms >= 0 and cal.frontend_token_ms >= 0):
            raise EstimatorError(f"{f}: level must be > 0 and the front end's costs >= 0")
        return cal


def predict(model: IterationEstimator, cal: Calibration, requests: Sequence[Request],
            level: float | None = None) -> pd.DataFrame:
    """Per-request predictions of `requests` on the calibrated server (the calibration's level, or `level`)."""
    frame, _ = run_workload(requests, cal.engine_config(), model, cal.config, Overheads(),
                            scale=cal.level if level is None else level, frontend=cal.frontend())
    return frame


def window_of(run: MeasuredRun, start_s: float = 0.0,
              span_s: float | None = None) -> tuple[list[Request], pd.DataFrame]:
    """The requests of a measured load that arrived in [start_s, start_s + span_s) (all from start_s when span_s is
    None), re-timed from 0, with their measured rows."""
    end = math.inf if span_s is None else start_s + span_s
    chosen = [r for r in run.workload if start_s <= r.arrival_s < end]
    if not chosen:
        raise EstimatorError(f"{run.label}: no request arrived in [{start_s:g}, {end:g}) s")
    t0 = chosen[0].arrival_s
    ids = {r.request_id for r in chosen}
    measured = run.requests[run.requests["request_id"].isin(ids)]
    return [r.declaring(arrival_s=r.arrival_s - t0) for r in chosen], measured


def _ok(measured: pd.DataFrame) -> pd.DataFrame:
    if "ok" in measured.columns:
        measured = measured[measured["ok"].astype(bool)]
    return measured


def _tpot_mean(frame: pd.DataFrame) -> float:
    v = frame["tpot_ms"].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def solve_level(model: IterationEstimator, cal: Calibration, requests: Sequence[Request], tpot_target_ms: float,
                tol: float = 0.005, steps: int = 12) -> float:
    """The level at which the simulated mean TPOT of `requests` equals `tpot_target_ms` (bracketed secant on the
    log of the level, within LEVEL_RANGE)."""
    if not math.isfinite(tpot_target_ms) or tpot_target_ms <= 0:
        raise EstimatorError("no measured TPOT to fit the level on (every request generated one token)")

    def gap(log_level: float) -> float:
        return math.log(_tpot_mean(predict(model, cal, requests, math.exp(log_level))) / tpot_target_ms)

    lo, hi = math.log(cal.level) - 0.7, math.log(cal.level) + 0.7
    g_lo, g_hi = gap(lo), gap(hi)
    floor, ceil = math.log(LEVEL_RANGE[0]), math.log(LEVEL_RANGE[1])
    while g_lo > 0 and lo > floor:
        lo, g_lo = max(lo - 1.0, floor), gap(max(lo - 1.0, floor))
    while g_hi < 0 and hi < ceil:
        hi, g_hi = min(hi + 1.0, ceil), gap(min(hi + 1.0, ceil))
    if g_lo > 0 or g_hi < 0:
        return math.exp(lo if g_lo > 0 else hi)  # the front end alone is slower (or the engine faster) than asked
    x = lo
    for _ in range(steps):
        x = hi - g_hi * (hi - lo) / (g_hi - g_lo) if g_hi != g_lo else (lo + hi) / 2
        g = gap(x)
        if abs(g) < tol:
            break
        if g > 0:
            hi, g_hi = x, g
            g_lo /= 2  # Illinois: keep the stale end from stalling the secant
        else:
            lo, g_lo = x, g
            g_hi /= 2
    return math.exp(x)


def _score(model: IterationEstimator, cal: Calibration, requests: Sequence[Request],
           measured: pd.DataFrame) -> tuple[float, dict[str, float]]:
    pairs = paired(predict(model, cal, requests), measured)
    ttft = np.abs(pairs["ttft_ms"] - pairs["ttft_ms_measured"]) / pairs["ttft_ms_measured"]
    e2e = np.abs(pairs["e2e_ms"] - pairs["e2e_ms_measured"]) / pairs["e2e_ms_measured"]
    parts = {
        "ttft_mape_pct": float(ttft.mean() * 100),
        "e2e_mape_pct": float(e2e.mean() * 100),
        "ttft_mean_error_pct": float((pairs["ttft_ms"].mean() / pairs["ttft_ms_measured"].mean() - 1) * 100),
        "e2e_mean_error_pct": float((pairs["e2e_ms"].mean() / pairs["e2e_ms_measured"].mean() - 1) * 100),
    }
    return (parts["ttft_mape_pct"] + parts["e2e_mape_pct"]) / 2, parts


def calibrate(model: IterationEstimator, model_dir: Path, run: MeasuredRun, config: dict[str, Any] | None = None,
              start_s: float = 0.0, span_s: float | None = None, grid: int = 6,
              min_window_s: float = MIN_WINDOW_S) -> Calibration:
    """Fit the level and the front end's costs on one window of a served load (module docstring)."""
    requests, measured = window_of(run, start_s, span_s)
    measured = _ok(measured)
    span = requests[-1].arrival_s if requests else 0.0
    if span < min_window_s:
        raise EstimatorError(f"{run.label}: the window spans {span:.1f} s of arrivals; calibrate on at least "
                             f"{min_window_s:g} s")
    if len(measured) < 20:
        raise EstimatorError(f"{run.label}: {len(measured)} successful requests in the window; need at least 20")
    cfg = dict(config or run.config)
    model.coefficients(cfg)  # an unknown config fails here, naming the trained ones
    tpot = float(measured["tpot_ms"].dropna().mean())
    ttft_low = float(np.percentile(measured["ttft_ms"], 10))
    itl_low = _itl_low(measured)
    base = Calibration(
        model=str(model_dir), run=str(run.path), load=run.load, config=cfg,
        engine={**asdict(run.engine)}, level=1.0, frontend_request_ms=0.0, frontend_token_ms=0.0,
        window_s=span, window_start_s=start_s, requests=len(measured), fit={}, created_at=utc_now(),
    )
    best: tuple[float, Calibration, dict[str, float]] | None = None
    req_top, tok_top = 0.8 * ttft_low, 0.8 * itl_low
    tried = 0

    def attempt(req_ms: float, tok_ms: float) -> None:
        nonlocal best, tried
        trial = base.model_copy(update={"frontend_request_ms": req_ms, "frontend_token_ms": tok_ms,
                                        "level": best[1].level if best else 1.0})
        trial = trial.model_copy(update={"level": solve_level(model, trial, requests, tpot)})
        score, parts = _score(model, trial, requests, measured)
        tried += 1
        if best is None or score < best[0]:
            best = (score, trial, parts)

    reqs, toks = np.linspace(0.0, req_top, grid), np.linspace(0.0, tok_top, grid)
    for req_ms in reqs:
        for tok_ms in toks:
            attempt(float(req_ms), float(tok_ms))
    assert best is not None
    d_req, d_tok = reqs[1] - reqs[0], toks[1] - toks[0]
    c_req, c_tok = best[1].frontend_request_ms, best[1].frontend_token_ms
    for req_ms in np.linspace(max(0.0, c_req - d_req), c_req + d_req, 5):
        for tok_ms in np.linspace(max(0.0, c_tok - d_tok), c_tok + d_tok, 5):
            attempt(float(req_ms), float(tok_ms))
    score, found, parts = best
    return found.model_copy(update={"fit": {
        "score_pct": score, **parts, "tpot_mean_measured_ms": tpot, "candidates": tried,
        "grid_request_ms_top": req_top, "grid_token_ms_top": tok_top,
        "method": "grid over the front end's costs; for each, the level matching the measured mean TPOT; "
                  "lowest mean of per-request TTFT and E2E MAPE",
    }})


def _itl_low(measured: pd.DataFrame) -> float:
    """The 10th percentile of the measured gaps between tokens (ms): a token's front-end cost is below it."""
    gaps = [g for row in measured.get("itl_ms", pd.Series(dtype=object)).dropna() for g in list(row)]
    if gaps:
        return float(np.percentile(gaps, 10))
    return float(np.percentile(measured["tpot_ms"].dropna(), 10)) if measured["tpot_ms"].notna().any() else 1.0


def follow_level(model: IterationEstimator, cal: Calibration, run: MeasuredRun, last_s: float = 30.0) -> float:
    """The level re-fitted on the last `last_s` seconds of arrivals of a measured load (the front end's costs
    kept): what a live follower knows when the next load starts."""
    end = run.workload[-1].arrival_s if run.workload else 0.0
    requests, measured = window_of(run, max(0.0, end - last_s))
    measured = _ok(measured)
    return solve_level(model, cal, requests, float(measured["tpot_ms"].dropna().mean()))
