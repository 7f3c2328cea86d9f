"""`estimate serve`'s llm-d answers against llm-d's own model, on the same live-server requests (issue 36).

The data: a `profile serve-bench` run of several loads. Each served request gets llm-d's features as a router would
have read them when it sent the request: the last one-second `/metrics` scrape at or before its send time
(`vllm:kv_cache_usage_perc`, `vllm:num_requests_waiting`, `vllm:num_requests_running`), its prompt length,
`num_tokens_generated` 0 and `prefix_cache_score` 0 (no prefix caching here); the targets are its measured TTFT and
its mean TPOT (ms). A request whose tokens reached the client in one burst (TPOT under a tenth of the median: the
client or the front end stalled) has no per-token time: it is left out of TPOT's training and scoring, counted.

Two-fold by load: the loads are split in two (even and odd positions), each fold trains on one half and predicts the
other, so every request is predicted by a model that never saw its load.
- **llm-d's recipe**: XGBoost on those six features, `reg:quantileerror` with `quantile_alpha` 0.9 for the p90 and
  `reg:squarederror` for the mean (llm-d-latency-predictor's model; its hyperparameters where it publishes them:
  XGB_PARAMS), one model per target.
- **This project's**: `estimate serve`'s llm-d answer (predictor.py: the iteration model through the replica from
  the stand-in state), at level 1, then one scalar per target learned on the training half: the ratio of the
  measured to the predicted mean for the mean, the 0.9 quantile of measured / predicted for the p90.

Scores on the held-out requests: pinball loss at 0.9 for the p90 answers, MAPE for the means; each with a 95%
bootstrap interval over requests, and the paired difference (this project's - llm-d's) with its own. The bootstrap
treats a load's requests as independent, which they are not (they share the server's state): the intervals are
narrower than the truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from estimator.data.runs import read_jsonl_dicts
from estimator.errors import EstimatorError

FEATURES = ["kv_cache_percentage", "input_token_length", "num_request_waiting", "num_request_running",
            "num_tokens_generated", "prefix_cache_score"]
TARGETS = ("ttft_ms", "tpot_ms")
ALPHA = 0.9
BUNDLED = 0.1  # a TPOT under this fraction of the median: tokens delivered in one burst (left out of TPOT's rows)
XGB_PARAMS = {"n_estimators": 200, "max_depth": 6, "learning_rate": 0.1, "subsample": 0.8, "tree_method": "hist"}
SERIES = {"kv_cache_percentage": "vllm:kv_cache_usage_perc", "num_request_waiting": "vllm:num_requests_waiting",
          "num_request_running": "vllm:num_requests_running"}


def _gauge(samples: dict[str, float], name: str) -> float:
    """A gauge's value in one scrape (summed over label sets: one engine here)."""
    vals = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    if not vals:
        raise EstimatorError(f"/metrics scrape lacks {name}")
    return float(sum(vals))


def load_rows(run: Path) -> pd.DataFrame:
    """One row per served request of every load of `run`: its load, llm-d's features at its send time, its
    measured TTFT and TPOT (ms)."""
    manifest = json.loads((run / "manifest.json").read_text())
    if manifest.get("kind") != "serve-bench":
        raise EstimatorError(f"{run}: not a serve-bench run")
    frames = []
    for entry in manifest.get("loads") or []:
        folder = run / "loads" / str(entry["index"])
        client = json.loads((folder / "client.json").read_text())
        scrapes = read_jsonl_dicts(folder / "metrics.jsonl")  # a scrape line cut short by a kill is skipped
        if not scrapes:
            raise EstimatorError(f"{folder}: no /metrics scrapes (metrics.jsonl)")
        at = np.array([s["mono_s"] for s in scrapes])
        req = pd.read_parquet(folder / "requests" / "serve.parquet")
        req = req[req["ok"].astype(bool)].reset_index(drop=True)
        starts = client.get("start_times") or []
        if not starts or not len(req):
            raise EstimatorError(f"{folder}: no start_times in client.json, or no request served")
        # sent_s counts from the first request sent; client.json's start_times are time.monotonic(), the scrapes' clock
        sent = float(min(starts)) + req["sent_s"].to_numpy(float)
        k = np.clip(np.searchsorted(at, sent, side="right") - 1, 0, len(scrapes) - 1)
        rows = pd.DataFrame({
            "load": int(entry["index"]), "request_id": req["request_id"],
            "input_token_length": req["text_tokens"].astype(int), "num_tokens_generated": 0,
            "prefix_cache_score": 0.0, "ttft_ms": req["ttft_ms"].astype(float),
            "tpot_ms": req["tpot_ms"].astype(float), "scrape_age_s": sent - at[k]})
        for feature, series in SERIES.items():
            rows[feature] = [_gauge(scrapes[i]["samples"], series) for i in k]
        frames.append(rows)
    if not frames:
        raise EstimatorError(f"{run}: no finished loads")
    out = pd.concat(frames, ignore_index=True)
    if out["load"].nunique() < 2:
        raise EstimatorError(f"{run}: needs at least 2 loads (two-fold by load)")
    return out


def pinball(y: np.ndarray, q: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Per-row pinball (quantile) loss of `q` as the `alpha` quantile of `y`."""
    d = y - q
    return np.maximum(alpha * d, (alpha - 1) * d)


def ape(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.abs(p - y) / y * 100.0


@dataclass(frozen=True)
class Scored:
    mean: float
    lo: float
    hi: float

    def as_json(self) -> dict[str, float]:
        return {"value": self.mean, "lo": self.lo, "hi": self.hi}


def boot(values: np.ndarray, n: int = 2000, seed: int = 0) -> Scored:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(axis=1)
    return Scored(float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def xgb_predict(train: pd.DataFrame, test: pd.DataFrame, target: str, objective: str) -> np.ndarray:
    """llm-d's recipe: XGBoost on its six features."""
    import xgboost as xgb

    extra = {"quantile_alpha": ALPHA} if objective == "reg:quantileerror" else {}
    model = xgb.XGBRegressor(objective=objective, random_state=0, n_jobs=1, **XGB_PARAMS, **extra)
    model.fit(train[FEATURES].to_numpy(float), train[target].to_numpy(float))
    return np.asarray(model.predict(test[FEATURES].to_numpy(float)), dtype=float)


def ours_raw(predictor: Any, rows: pd.DataFrame) -> np.ndarray:
    """`estimate serve`'s llm-d answers (ttft_ms, tpot_ms) at level 1 for every row: an (n, 2) array."""
    out = np.empty((len(rows), 2))
    for i, r in enumerate(rows.itertuples(index=False)):
        out[i] = predictor.llmd(float(min(r.kv_cache_percentage, 1.0)), int(r.input_token_length),
                                int(r.num_request_waiting), int(r.num_request_running), 0, 0.0)
    return out


def serve_accuracy(predictor: Any, run: Path) -> dict[str, Any]:
    """The comparison (module docstring) as a JSON-ready dict."""
    rows = load_rows(run)
    rows = rows[(rows["ttft_ms"] > 0) & (rows["tpot_ms"] > 0)].reset_index(drop=True)
    # a request whose tokens reached the client in one burst (TPOT under BUNDLED x the median: the client or the
    # front end stalled, then delivered them together) has no per-token time to predict: left out of TPOT's rows
    bundled = (rows["tpot_ms"] < BUNDLED * rows["tpot_ms"].median()).to_numpy()
    valid = {"ttft_ms": np.ones(len(rows), dtype=bool), "tpot_ms": ~bundled}
    loads = sorted(rows["load"].unique())
    folds = [set(loads[0::2]), set(loads[1::2])]
    raw = ours_raw(predictor, rows)
    preds = {k: np.full(len(rows), np.nan) for k in
             ("xgb_p90_ttft_ms", "xgb_p90_tpot_ms", "xgb_mean_ttft_ms", "xgb_mean_tpot_ms", "ours_p90_ttft_ms",
              "ours_p90_tpot_ms", "ours_mean_ttft_ms", "ours_mean_tpot_ms")}
    scales = []
    for held in folds:
        test = rows["load"].isin(held).to_numpy()
        train = ~test
        for j, target in enumerate(TARGETS):
            name = target.removesuffix("_ms")
            fit = train & valid[target]
            preds[f"xgb_p90_{name}_ms"][test] = xgb_predict(rows[fit], rows[test], target, "reg:quantileerror")
            preds[f"xgb_mean_{name}_ms"][test] = xgb_predict(rows[fit], rows[test], target, "reg:squarederror")
            ratio = rows.loc[fit, target].to_numpy(float) / raw[fit, j]
            # the mean's scale matches the training half's mean (as the squared-error model's does), not the median
            s_mean = float(rows.loc[fit, target].mean() / raw[fit, j].mean())
            s_p90 = float(np.quantile(ratio, ALPHA))
            preds[f"ours_mean_{name}_ms"][test] = raw[test, j] * s_mean
            preds[f"ours_p90_{name}_ms"][test] = raw[test, j] * s_p90
            scales.append({"held_out_loads": sorted(int(x) for x in held), "target": target, "mean_scale": s_mean,
                           "p90_scale": s_p90})
    result: dict[str, Any] = {"run": str(run), "requests": len(rows), "loads": [int(x) for x in loads],
                              "features": FEATURES, "xgb_params": XGB_PARAMS, "alpha": ALPHA, "scales": scales,
                              "scrape_age_s_median": float(rows["scrape_age_s"].median()),
                              "tpot_bundled_left_out": int(bundled.sum()), "scores": {}}
    for target in TARGETS:
        name = target.removesuffix("_ms")
        v = valid[target]
        y = rows[target].to_numpy(float)[v]
        p = {k: preds[f"{k}_{name}_ms"][v] for k in ("xgb_p90", "ours_p90", "xgb_mean", "ours_mean")}
        pin_x, pin_o = pinball(y, p["xgb_p90"]), pinball(y, p["ours_p90"])
        ape_x, ape_o = ape(y, p["xgb_mean"]), ape(y, p["ours_mean"])
        result["scores"][target] = {
            "pinball_p90_ms": {"llmd_xgboost": boot(pin_x).as_json(), "ours": boot(pin_o).as_json(),
                               "ours_minus_llmd": boot(pin_o - pin_x).as_json()},
            "coverage_p90": {"llmd_xgboost": float(np.mean(y <= p["xgb_p90"])),
                             "ours": float(np.mean(y <= p["ours_p90"]))},
            "mape_mean_pct": {"llmd_xgboost": boot(ape_x).as_json(), "ours": boot(ape_o).as_json(),
                              "ours_minus_llmd": boot(ape_o - ape_x).as_json()},
            "measured_mean_ms": float(y.mean()), "requests": int(v.sum())}
    return result
