"""Calibration on the running server: what an offline model cannot know, fitted on one observed window of it.

A served load (`profile serve-bench`, one `loads/<i>/`: the client's per-request results) gives, for the server start
it ran on:
- `level`: this start's speed as a ratio to the iteration model (every predicted iteration times `level`). On a
  shared CPU it moves from start to start and minute to minute (docs/simulate.md); only the server can tell it.
- `iteration_ms`, `sequence_ms`: what the serving engine core spends per iteration and per sequence in it that the
  model, trained on replays, does not hold (scheduling, output processing, the hand-off to the front end). They are
  the serving software's costs on this machine, not this start's: fitted once across loads of different rates
  (`estimate simulate MODEL --fit-overheads RUN`, into MODEL/serving.json) and copied from there. One window at one
  rate cannot tell them from the level: a level fitted in their place weighs small (light-load) iterations as much as
  large ones, is too high at a heavier load, and near capacity that error is amplified (docs/simulate.md).
- `frontend_request_ms`, `frontend_token_ms`: the API server's own work per request (parse, tokenize) and per
  streamed token (detokenize, stream), as a FIFO queue on one CPU (estimator/sim/scheduler.py `Frontend`). Their
  sum over the window is the API server process's measured CPU time (serve-bench keeps it per load).
- `request_ms`: what remains of the TTFT as a constant that does not queue (HTTP, the client's own handling).

The fit: the level that makes the simulated mean TPOT equal the measured one (a bracketed secant: mean TPOT grows
with the level), the front end left out; then the front end's measured CPU time over the window is split between
per request and per token on a grid (without CPU figures: a grid over both costs), each split simulated with the
constant that matches the TTFT mean; the split with the lowest mean |error| of the TTFT mean and p90 and the E2E
mean wins; then the level is solved again with it.

A calibration takes serving.json's per-step terms and replaces its per-request constant with the front end's queue:
with `--calibration`, serving.json is not read again (`--fit-overheads`, `--gap-overheads`, `--no-overheads` are
refused beside it). It carries the engine limits and the config, so
`estimate simulate --calibration CAL` needs neither `--engine` nor `--config`.

`follow_level` re-fits the level alone on the newest client results (the other terms kept): following the server
as it moves; `live_levels` does it every 10 s during a load, from the requests finished by then, and `predict`
takes the resulting level over time (`level_at`).
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Callable, Sequence
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
    iteration_ms: float = 0.0  # added to every iteration (after the level): serving.json's, not fitted here
    sequence_ms: float = 0.0  # added per sequence in an iteration: serving.json's
    request_ms: float = 0.0  # a constant added to every TTFT and E2E (HTTP, the client): it does not queue
    steps_from: str = ""  # where the per-step terms came from
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

    def overheads(self) -> Overheads:
        return Overheads(iteration_ms=self.iteration_ms, sequence_ms=self.sequence_ms, request_ms=self.request_ms,
                         fitted_on=self.steps_from)

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
        if not (cal.level > 0 and min(cal.iteration_ms, cal.sequence_ms, cal.request_ms, cal.frontend_request_ms,
                                       cal.frontend_token_ms) >= 0):
            raise EstimatorError(f"{f}: level must be > 0, the per-step terms and the front end's costs >= 0")
        return cal


def predict(model: IterationEstimator, cal: Calibration, requests: Sequence[Request],
            level: float | None = None, level_at: Callable[[float], float] | None = None) -> pd.DataFrame:
    """Per-request predictions of `requests` on the calibrated server: at the calibration's level, at `level`, or
    at a level that moves over the run (`level_at`: s of the run -> level)."""
    scale = 1.0 if level_at is not None else cal.level if level is None else level
    frame, _ = run_workload(requests, cal.engine_config(), model, cal.config, cal.overheads(), scale=scale,
                            frontend=cal.frontend(), level_at=level_at)
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
    return _solve(lambda level: _tpot_mean(predict(model, cal, requests, level)), tpot_target_ms, cal.level, tol,
                  steps)


def _solve(tpot_at: Callable[[float], float], tpot_target_ms: float, start: float, tol: float = 0.005,
           steps: int = 12) -> float:
    """The level at which `tpot_at(level)` (growing with the level) equals the target: a bracketed secant (Illinois)
    on the log of the level, within LEVEL_RANGE."""
    if not math.isfinite(tpot_target_ms) or tpot_target_ms <= 0:
        raise EstimatorError("no measured TPOT to fit the level on (every request generated one token)")

    def gap(log_level: float) -> float:
        return math.log(tpot_at(math.exp(log_level)) / tpot_target_ms)

    lo, hi = math.log(start) - 0.7, math.log(start) + 0.7
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
    """The window's fit: the mean of |relative error| of the TTFT mean and p90 and the E2E mean (the statistics the
    targets name; a per-request MAPE would favour predicting low), with the per-request MAPEs reported beside."""
    pairs = paired(predict(model, cal, requests), measured)

    def err(col: str, stat: Any) -> float:
        return float((stat(pairs[col]) / stat(pairs[f"{col}_measured"]) - 1) * 100)

    parts = {
        "ttft_mape_pct": float((np.abs(pairs["ttft_ms"] - pairs["ttft_ms_measured"]) / pairs["ttft_ms_measured"]).mean()
                               * 100),
        "e2e_mape_pct": float((np.abs(pairs["e2e_ms"] - pairs["e2e_ms_measured"]) / pairs["e2e_ms_measured"]).mean()
                              * 100),
        "ttft_mean_error_pct": err("ttft_ms", np.mean),
        "ttft_p90_error_pct": err("ttft_ms", lambda v: np.percentile(v, 90)),
        "e2e_mean_error_pct": err("e2e_ms", np.mean),
    }
    score = sum(abs(parts[k]) for k in ("ttft_mean_error_pct", "ttft_p90_error_pct", "e2e_mean_error_pct")) / 3
    return score, parts


def calibrate(model: IterationEstimator, model_dir: Path, run: MeasuredRun, config: dict[str, Any] | None = None,
              start_s: float = 0.0, span_s: float | None = None, grid: int = 6,
              min_window_s: float = MIN_WINDOW_S) -> Calibration:
    """Fit this start's level and the front end's costs (and the constant) on one window of a served load, with
    MODEL/serving.json's per-step terms (module docstring)."""
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
    base = Calibration(
        model=str(model_dir), run=str(run.path), load=run.load, config=cfg,
        engine={**asdict(run.engine)}, level=1.0, frontend_request_ms=0.0, frontend_token_ms=0.0,
        window_s=span, window_start_s=start_s, requests=len(measured), fit={}, created_at=utc_now(),
    )
    steps = Overheads.load(model_dir)  # the serving software's per-step costs (estimate calibrate --steps)
    base = base.model_copy(update={"iteration_ms": steps.iteration_ms, "sequence_ms": steps.sequence_ms,
                                   "steps_from": steps.fitted_on or "none (no serving.json: 0)"})
    base = base.model_copy(update={"level": solve_level(model, base, requests, tpot)})
    best: tuple[float, Calibration, dict[str, float]] | None = None
    tried = 0
    tokens = float(measured["new_tokens"].sum())
    cpu_ms = _frontend_cpu_ms(run, len(measured))

    def attempt(req_ms: float, tok_ms: float) -> None:
        nonlocal best, tried
        trial = base.model_copy(update={"frontend_request_ms": req_ms, "frontend_token_ms": tok_ms,
                                        "request_ms": 0.0})
        gap = float(measured["ttft_ms"].mean() - predict(model, trial, requests)["ttft_ms"].mean())
        trial = trial.model_copy(update={"request_ms": max(0.0, gap)})  # a constant adds exactly
        score, parts = _score(model, trial, requests, measured)
        tried += 1
        if best is None or score < best[0]:
            best = (score, trial, parts)

    if cpu_ms is not None:  # the front end's measured CPU, split between per request and per token
        shares = np.linspace(0.0, 1.0, 2 * grid - 1)
        for f in shares:
            attempt(float(f * cpu_ms / len(measured)), float((1 - f) * cpu_ms / max(tokens, 1.0)))
        how = (f"front end: its measured CPU ({cpu_ms:.0f} ms over the window) split between per request and per "
               "token on a grid")
    else:  # no CPU figures (a run from before they were kept): a grid over both costs
        req_top, tok_top = 0.8 * float(np.percentile(measured["ttft_ms"], 10)), 0.8 * _itl_low(measured)
        reqs, toks = np.linspace(0.0, req_top, grid), np.linspace(0.0, tok_top, grid)
        for req_ms in reqs:
            for tok_ms in toks:
                attempt(float(req_ms), float(tok_ms))
        how = "front end: grid over its per-request and per-token costs (no CPU figures in the run)"
    assert best is not None
    found = best[1]
    found = found.model_copy(update={"level": solve_level(model, found, requests, tpot)})
    score, parts = _score(model, found, requests, measured)
    return found.model_copy(update={"fit": {
        "score_pct": score, **parts, "tpot_mean_measured_ms": tpot, "candidates": tried,
        "frontend_cpu_ms": cpu_ms,
        "method": f"per-step terms from serving.json; level matching the measured mean TPOT; {how}, each with the "
                  "constant latency that matches the TTFT mean; lowest mean |error| of the TTFT mean and p90 and the "
                  "E2E mean wins; then the level again",
    }})


def _frontend_cpu_ms(run: MeasuredRun, requests: int) -> float | None:
    """The API server's CPU time (ms) over the load (server_metrics.json `cpu_s`), scaled to the window's share of
    the load's requests; None when the run did not keep it."""
    figures = run.server_figures() or {}
    cpu = (figures.get("cpu_s") or {}).get("api_server")
    if cpu is None or not len(run.requests):
        return None
    return float(cpu) * 1e3 * requests / len(run.requests)


def fit_steps(model: IterationEstimator, model_dir: Path, runs: Sequence[MeasuredRun],
              config: dict[str, Any] | None = None, grid: int = 16) -> Overheads:
    """The serving software's per-iteration term, fitted on loads of different rates served on one start: the term
    at which one level explains every load's mean TPOT (for each candidate on a grid, 0 to 1.5x the median modeled
    iteration, the level is solved per load; the candidate whose levels spread least, in log, wins). Returned as
    serving overheads (the per-request constant 0: a calibration's front end carries it)."""
    if len(runs) < 2:
        raise EstimatorError("fitting the per-iteration term needs at least 2 loads at different rates (one load "
                             "cannot tell it from the level)")
    cfg = dict(config or runs[0].config)
    model.coefficients(cfg)
    _, sim = run_workload(runs[0].workload, runs[0].engine, model, cfg, Overheads(), keep_steps=True)
    top = 1.5 * float(np.median([st.t_end_s - st.t_start_s for st in sim.steps])) * 1e3 if sim.steps else 1.0
    base = [Calibration(model=str(model_dir), run=str(r.path), load=r.load, config=cfg, engine={**asdict(r.engine)},
                        level=1.0, frontend_request_ms=0.0, frontend_token_ms=0.0, window_s=0.0, requests=0, fit={},
                        created_at=utc_now()) for r in runs]
    tpots = [float(_ok(r.requests)["tpot_ms"].dropna().mean()) for r in runs]
    rows = []
    for over in np.linspace(0.0, top, grid):
        levels = [solve_level(model, b.model_copy(update={"iteration_ms": float(over)}), r.workload, t)
                  for b, r, t in zip(base, runs, tpots, strict=True)]
        rows.append((float(np.std(np.log(levels))), float(over), levels))
    spread, over, levels = min(rows)
    return Overheads(iteration_ms=over, fitted_on=", ".join(r.label for r in runs), fit={
        "method": "per-iteration term at which one level explains every load's mean TPOT (least spread of the "
                  "per-load levels, in log)",
        "levels": levels, "level_spread_log": spread, "grid_top_ms": top,
        "tpot_mean_measured_ms": tpots, "candidates": [[o, lv] for _, o, lv in rows],
    })


def live_levels(model: IterationEstimator, cal: Calibration, run: MeasuredRun, start_level: float,
                step_s: float = 10.0, window_s: float = 30.0, min_requests: int = 20) -> list[tuple[float, float]]:
    """A live follower's level over a load, as (time s, level) steps: `start_level` from 0 (what it knew when the
    load began), then every `step_s` the level of the last `window_s`, re-fitted so that the requests finished by
    then in that window get their measured mean TPOT, with the load so far simulated (its queue included) at the
    levels fitted before (kept until the next step when fewer than `min_requests` finished)."""
    req = _ok(run.requests).set_index("request_id")
    end_s = {r.request_id: r.arrival_s + float(req.at[r.request_id, "e2e_ms"]) / 1e3 for r in run.workload
             if r.request_id in req.index}
    steps = [(0.0, start_level)]
    last = run.workload[-1].arrival_s if run.workload else 0.0
    t = step_s
    while t <= last:
        done = [r.request_id for r in run.workload
                if t - window_s <= r.arrival_s < t and end_s.get(r.request_id, math.inf) <= t]
        if len(done) >= min_requests:
            past = [r for r in run.workload if r.arrival_s < t]
            before = [(u, lv) for u, lv in steps if u < t - window_s] or [(0.0, steps[0][1])]

            def tpot_at(level: float, past: list[Request] = past, before: list[tuple[float, float]] = before,
                        done: list[str] = done, t: float = t) -> float:
                frame = predict(model, cal, past, level_at=step_function([*before, (max(0.0, t - window_s), level)]))
                return _tpot_mean(frame.set_index("request_id").loc[done])

            tpot = float(req.loc[done, "tpot_ms"].dropna().mean())
            steps.append((t, _solve(tpot_at, tpot, steps[-1][1])))
        t += step_s
    return steps


def step_function(steps: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """(time, value) steps, sorted by time, as a function of time (the value of the last step at or before it)."""
    times = [t for t, _ in steps]
    values = [v for _, v in steps]

    def at(t: float) -> float:
        return values[max(0, bisect.bisect_right(times, t) - 1)]

    return at


def _itl_low(measured: pd.DataFrame) -> float:
    """The 10th percentile of the measured gaps between tokens (ms): a token's front-end cost is below it."""
    gaps = [g for row in measured.get("itl_ms", pd.Series(dtype=object)).dropna() for g in list(row)]
    if gaps:
        return float(np.percentile(gaps, 10))
    return float(np.percentile(measured["tpot_ms"].dropna(), 10)) if measured["tpot_ms"].notna().any() else 1.0


def follow_level(model: IterationEstimator, cal: Calibration, run: MeasuredRun, last_s: float = 30.0) -> float:
    """The level re-fitted on the last `last_s` seconds of arrivals of a measured load (the per-iteration term and
    the front end's costs kept): what a live follower knows when the next load starts."""
    end = run.workload[-1].arrival_s if run.workload else 0.0
    requests, measured = window_of(run, max(0.0, end - last_s))
    measured = _ok(measured)
    return solve_level(model, cal, requests, float(measured["tpot_ms"].dropna().mean()))
