"""The research question at batch level, and the iteration model's validation on workloads it never saw.

`compare_feature_sets`: is an iteration's token total enough, or does its mix matter? Four nested feature sets
(totals; + context sums; + max/min/skew of the decode contexts; + per-request detail), each with LightGBM and with
a linear least-squares model per config, scored by k folds grouped by segment (a replay or batch point is never
on both sides), repeated over seeds. Every MAPE carries a 95% interval (corrected resampled t), every set is
compared with `totals` as a paired relative MAPE reduction with its interval, and the notes' 2% / 5% rule is
applied to that interval (`estimator.study.intervals.decide`).

`validate_iterations`: a trained iteration model on measured iterations: MAPE per iteration against the
iterations' own noise floor (near-equal compositions, leave-one-out with the small-n correction √((n−1)/n)),
and each request's TTFT and end-to-end latency with its iterations' measured latencies replaced by predicted
ones along the measured schedule (the queue wait before its first iteration is kept as measured).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from estimator.data.iterations import load_iteration_runs, with_derived
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.strict import StrictModel
from estimator.study.intervals import bootstrap_interval, corrected_t_interval, decide

_TOTALS = ["prefill_tokens", "num_decode_seqs"]
_CONTEXT = [*_TOTALS, "decode_ctx_sum", "prefill_ctx_sum"]
_SKEW = [*_CONTEXT, "decode_ctx_max", "decode_ctx_min", "ctx_skew", "decode_skew_sum"]
# Nested: each set is the one before plus its own columns.
FEATURE_SETS: dict[str, list[str]] = {
    "totals": _TOTALS,
    "context": _CONTEXT,
    "skew": _SKEW,
    "detail": [*_SKEW, "num_prefill_seqs", "prefill_sq_sum"],
}
LEARNERS = ("lightgbm", "linear")
BASE_SET = "totals"


class Iv(StrictModel):
    mean: float | None
    low: float | None
    high: float | None


class SetScore(StrictModel):
    feature_set: str
    learner: str
    mape_pct: Iv
    improvement_pct: Iv | None  # relative MAPE reduction vs totals (same learner), paired per fold
    decision: str | None
    note: str | None


class BatchStudyResult(StrictModel):
    """`<run>/batch/batch.json`."""

    runs: list[str]
    iterations: int
    segments: int
    folds: int
    seeds: int
    scores: list[SetScore]
    lines: list[str]


def _matrix(frame: pd.DataFrame, columns: Sequence[str], config_columns: Sequence[str]) -> np.ndarray:
    cfg = [pd.factorize(frame[c].astype(str), sort=True)[0].astype(np.float64) for c in config_columns]
    return np.column_stack([*cfg, *(frame[c].to_numpy(dtype=np.float64) for c in columns)])


def _fit_predict(
    learner: str, train: pd.DataFrame, test: pd.DataFrame, cols: list[str], cfg_cols: list[str], seed: int
) -> np.ndarray:
    y = train["latency_ms"].to_numpy(dtype=np.float64)
    if learner == "lightgbm":
        import lightgbm as lgb

        both = pd.concat([train, test], ignore_index=True)
        x = _matrix(both, cols, cfg_cols)
        params = {
            "objective": "regression",
            "learning_rate": 0.05,
            "num_leaves": 15,
            "verbose": -1,
            "seed": seed,
            "min_data_in_leaf": max(2, min(20, len(train) // 20)),
            "num_threads": 1,
            "deterministic": True,
        }
        booster = lgb.train(params, lgb.Dataset(x[: len(train)], np.log(y)), num_boost_round=200)
        return np.exp(booster.predict(x[len(train) :], num_threads=1))
    out = np.full(len(test), np.nan)
    groups_tr = train.groupby(cfg_cols, sort=False).indices if cfg_cols else {(): np.arange(len(train))}
    groups_te = test.groupby(cfg_cols, sort=False).indices if cfg_cols else {(): np.arange(len(test))}
    for key, idx in groups_te.items():
        tr = groups_tr.get(key)
        if tr is None:
            continue
        xtr = np.column_stack([np.ones(len(tr)), train.iloc[tr][cols].to_numpy(dtype=np.float64)])
        scale = np.maximum(np.abs(xtr).max(axis=0), 1e-12)
        w = 1.0 / y[tr]  # relative error, as MAPE scores it
        coef, *_ = np.linalg.lstsq(xtr / scale * w[:, None], y[tr] * w, rcond=None)
        xte = np.column_stack([np.ones(len(idx)), test.iloc[idx][cols].to_numpy(dtype=np.float64)])
        out[idx] = np.maximum(xte / scale @ coef, 1e-3)
    return out


def _mape(y: np.ndarray, yhat: np.ndarray) -> float:
    ok = np.isfinite(yhat)
    return float(np.mean(np.abs(yhat[ok] - y[ok]) / y[ok]) * 100.0) if ok.any() else float("nan")


def compare_feature_sets(runs: Sequence[Path], k: int = 5, seeds: int = 3) -> BatchStudyResult:
    """Every feature set × learner on k folds grouped by segment, repeated over `seeds` shuffles."""
    itset = load_iteration_runs(runs)
    frame = with_derived(itset)
    groups = np.unique(frame["_group"])
    if len(groups) < 3:
        raise EstimatorError(f"{len(groups)} segments: grouped folds need at least 3 replays or batch points")
    k = min(k, len(groups))
    cfg_cols = itset.config_columns
    per_fold: dict[tuple[str, str], list[float]] = {}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        fold_of = dict(zip(rng.permutation(groups), np.arange(len(groups)) % k, strict=True))
        fold = frame["_group"].map(fold_of).to_numpy()
        for f in range(k):
            train, test = frame[fold != f], frame[fold == f]
            y = test["latency_ms"].to_numpy(dtype=np.float64)
            for name, cols in FEATURE_SETS.items():
                for learner in LEARNERS:
                    pred = _fit_predict(learner, train, test, cols, cfg_cols, seed)
                    per_fold.setdefault((name, learner), []).append(_mape(y, pred))
    ratio = 1.0 / max(k - 1, 1)
    per_config = len(groups) / max(1, frame.groupby(cfg_cols).ngroups if cfg_cols else 1)
    scores: list[SetScore] = []
    lines: list[str] = []
    for (name, learner), values in per_fold.items():
        iv = corrected_t_interval(values, ratio)
        imp = decision = note = None
        if name != BASE_SET:
            base = np.asarray(per_fold[(BASE_SET, learner)])
            rel = (base - np.asarray(values)) / base * 100.0
            imp_iv = corrected_t_interval(rel.tolist(), ratio)
            d = decide(imp_iv, False, per_config)
            imp, decision, note = _iv(imp_iv), d.decision, d.note
            lines.append(
                f"{learner}, {name} vs {BASE_SET}: MAPE {iv.mean:.1f}% [{iv.low:.1f}, {iv.high:.1f}], reduction "
                f"{imp_iv.mean:+.1f}% [{imp_iv.low:+.1f}, {imp_iv.high:+.1f}] → {d.decision}"
            )
        scores.append(
            SetScore(
                feature_set=name, learner=learner, mape_pct=_iv(iv), improvement_pct=imp, decision=decision, note=note
            )
        )
    return BatchStudyResult(
        runs=[r.run_id for r in itset.runs],
        iterations=len(frame),
        segments=len(groups),
        folds=k,
        seeds=seeds,
        scores=scores,
        lines=lines,
    )


def _iv(i: Any) -> Iv:
    def num(v: float) -> float | None:
        return float(v) if np.isfinite(v) else None

    return Iv(mean=num(i.mean), low=num(i.low), high=num(i.high))


class ValidationResult(StrictModel):
    """`<run>/validation/validation.json`; per-iteration predictions in validation/iterations.parquet."""

    model: str
    runs: list[str]
    iterations: int
    requests: int
    iteration_mape_pct: float
    noise_floor_mape_pct: float | None
    noise_floor_groups: int
    ratio_to_floor: float | None
    ttft_mape_pct: float | None
    e2e_mape_pct: float | None
    mape_by_batch_size: dict[str, float]
    method: str
    # per iteration kind (prefill-only, mixed, decode-only): iterations, MAPE % and mean signed error %
    by_kind: dict[str, dict[str, float]] = {}
    # bootstrap 95% intervals [low, high] of iteration_mape_pct, ttft_mape_pct, e2e_mape_pct and the decode-only
    # mean signed error (decode_only_signed_pct): iterations or requests resampled independently, so the
    # correlation between neighbouring iterations of a run is not in them; an interval over seeds is wider
    intervals: dict[str, list[float]] = {}


def _interval(stat: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, p: np.ndarray) -> list[float]:
    """Bootstrap 95% interval of stat(measured, predicted), rows resampled independently (each its own group in
    `bootstrap_interval`); [] where it cannot be computed."""
    iv = bootstrap_interval(lambda idx: stat(y[idx], p[idx]), np.arange(len(y)), n_boot=1000)
    return [iv.low, iv.high] if np.isfinite(iv.low) and np.isfinite(iv.high) else []


def _signed(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) / y) * 100.0)


def _by_kind(out: pd.DataFrame) -> dict[str, dict[str, float]]:
    kinds = iteration_kind(out)
    result = {}
    for kind in KINDS:
        sub = out[kinds == kind]
        if len(sub):
            y, p = sub["latency_ms"].to_numpy(dtype=np.float64), sub["predicted_ms"].to_numpy(dtype=np.float64)
            result[kind] = {
                "iterations": float(len(sub)),
                "mape_pct": _mape(y, p),
                "signed_pct": _signed(y, p),
            }
    return result


def noise_floor(frame: pd.DataFrame, config_columns: Sequence[str]) -> tuple[float | None, int]:
    """Leave-one-out MAPE among near-equal compositions (same config, prefill tokens, prefill and decode counts,
    Σ context within one 2% log bin), scaled by √((n−1)/n) for the small-n bias of leave-one-out."""
    ctx_bin = np.floor(np.log(np.maximum(frame["decode_ctx_sum"].to_numpy(dtype=np.float64), 1.0)) / np.log(1.02))
    keys = [*config_columns, "num_prefill_seqs", "prefill_tokens", "num_decode_seqs"]
    g = frame.assign(_ctx=ctx_bin).groupby([*keys, "_ctx"], sort=False)["latency_ms"]
    n = g.transform("size").to_numpy()
    s = g.transform("sum").to_numpy()
    y = frame["latency_ms"].to_numpy(dtype=np.float64)
    ok = n >= 2
    if not ok.any():
        return None, 0
    others = (s[ok] - y[ok]) / (n[ok] - 1)
    ape = np.abs(others - y[ok]) / y[ok] * np.sqrt((n[ok] - 1) / n[ok]) * 100.0
    groups = int(g.ngroups - (g.size() < 2).sum())
    return float(np.mean(ape)), groups


KINDS = ("prefill-only", "mixed", "decode-only")


def iteration_kind(frame: pd.DataFrame) -> np.ndarray:
    """prefill-only / mixed / decode-only per iteration row."""
    pre = frame["num_prefill_seqs"].to_numpy() > 0
    dec = frame["num_decode_seqs"].to_numpy() > 0
    return np.where(pre & ~dec, KINDS[0], np.where(pre & dec, KINDS[1], KINDS[2]))


def check_held_out(est: IterationEstimator, runs: Sequence[Path]) -> None:
    """The held-out rule: a run the model was trained on, or one replaying the same workload file as a training
    replay, is refused (EstimatorError naming it)."""
    from estimator.data.runs import read_manifest
    from estimator.model.iteration import workload_digest

    trained = set(est.meta.runs)
    digests = set(est.meta.workload_digests)
    for run in runs:
        run_id = str(read_manifest(Path(run)).get("run_id") or Path(run).name)
        if run_id in trained:
            raise EstimatorError(f"run {run_id} was used to train this model: validate on runs it never saw")
        digest = workload_digest(Path(run))
        if digest and digest in digests:
            raise EstimatorError(
                f"run {run_id} replays the same workload as a training run of this model: validate on workloads it "
                "never saw"
            )


def validate_iterations(model_dir: Path, runs: Sequence[Path]) -> tuple[ValidationResult, pd.DataFrame]:
    est = IterationEstimator.load(model_dir)
    check_held_out(est, runs)
    itset = load_iteration_runs(runs)
    frame = with_derived(itset)
    pred = est.predict_frame(frame)
    y = frame["latency_ms"].to_numpy(dtype=np.float64)
    out = frame.assign(predicted_ms=pred)
    floor, floor_groups = noise_floor(frame, itset.config_columns)
    mape = _mape(y, pred)
    by_batch = {
        str(b): _mape(sub["latency_ms"].to_numpy(), sub["predicted_ms"].to_numpy())
        for b, sub in out.groupby(np.minimum(out["num_prefill_seqs"] + out["num_decode_seqs"], 16))
    }
    ttft = e2e = None
    intervals = {"iteration_mape_pct": _interval(_mape, y, pred)}
    decode = iteration_kind(out) == KINDS[2]
    if decode.any():
        intervals["decode_only_signed_pct"] = _interval(_signed, y[decode], pred[decode])
    req = itset.requests
    if len(req) and {"first_iteration", "last_iteration", "ttft_ms", "e2e_ms"} <= set(req.columns):
        diff = out.assign(_d=out["latency_ms"] - out["predicted_ms"])
        keys = ["run_id", "segment_id"]
        cum = diff.sort_values([*keys, "iteration"]).groupby(keys)
        table = {key: (g["iteration"].to_numpy(), np.cumsum(g["_d"].to_numpy())) for key, g in cum}
        t_meas, t_pred, e_meas, e_pred = [], [], [], []
        for r in req.itertuples(index=False):
            key = (str(r.run_id), str(r.segment_id))
            if key not in table:
                continue
            its, c = table[key]
            lo, hi = np.searchsorted(its, [r.first_iteration, r.last_iteration])
            if hi >= len(its) or its[lo] != r.first_iteration or its[hi] != r.last_iteration:
                continue
            before = c[lo - 1] if lo else 0.0
            t_meas.append(r.ttft_ms)
            t_pred.append(r.ttft_ms - (c[lo] - before))
            e_meas.append(r.e2e_ms)
            e_pred.append(r.e2e_ms - (c[hi] - before))
        if t_meas:
            ttft = _mape(np.asarray(t_meas), np.asarray(t_pred))
            e2e = _mape(np.asarray(e_meas), np.asarray(e_pred))
            intervals["ttft_mape_pct"] = _interval(_mape, np.asarray(t_meas), np.asarray(t_pred))
            intervals["e2e_mape_pct"] = _interval(_mape, np.asarray(e_meas), np.asarray(e_pred))
    result = ValidationResult(
        model=str(model_dir),
        runs=[r.run_id for r in itset.runs],
        iterations=len(frame),
        requests=len(req),
        iteration_mape_pct=mape,
        noise_floor_mape_pct=floor,
        noise_floor_groups=floor_groups,
        ratio_to_floor=mape / floor if floor else None,
        ttft_mape_pct=ttft,
        e2e_mape_pct=e2e,
        mape_by_batch_size=by_batch,
        by_kind=_by_kind(out),
        intervals={k: v for k, v in intervals.items() if v},
        method=__doc__.split("`validate_iterations`: ", 1)[1].strip() if __doc__ else "",
    )
    return result, out[
        [
            *itset.config_columns,
            "run_id",
            "segment_id",
            "iteration",
            "latency_ms",
            "predicted_ms",
            "num_prefill_seqs",
            "num_decode_seqs",
        ]
    ]


def write_json(result: BaseModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.model_dump(mode="json"), indent=1) + "\n")
    tmp.replace(path)
    return path
