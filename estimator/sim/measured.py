"""Measured workloads to judge the simulator by: a `profile replay` run or a `profile serve-bench` run.

Both folders hold `workload.jsonl` (the arrivals), a manifest with the engine's effective config, and a `requests/`
table with `request_id`, `ttft_ms`, `e2e_ms`, `new_tokens` (serve-bench's from vLLM's own client, its definitions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract.manifest import REQUEST_COLUMNS
from contract.request import Request
from contract.workload import WorkloadError, read_workload
from estimator.data.runs import load_folder, read_manifest, read_parquet_folder, served_requests
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.sim.scheduler import EngineConfig
from estimator.sim.workload import METRICS, STATS, Overheads, engine_config_from_manifest, run_workload


@dataclass
class MeasuredRun:
    """A measured workload: its arrivals, the engine it ran on, and each request's measured latencies (ms)."""

    path: Path
    kind: str  # "replay" or "serve-bench"
    manifest: dict[str, Any]
    workload: list[Request]
    engine: EngineConfig
    requests: pd.DataFrame  # request_id, ttft_ms, tpot_ms, e2e_ms (+ queue_ms for replays)
    config: dict[str, Any]
    load: int = 0  # which load of the run (serve-bench runs several on one server start)
    folder: Path | None = None  # the load's own folder (the run folder for a run of one load)

    @property
    def label(self) -> str:
        """The run's folder name, with the load where the run has several."""
        return self.path.name + (f" load {self.load}" if self.folder is not None and self.folder != self.path else "")

    def server_figures(self) -> dict[str, Any] | None:
        """The server's histograms and counters over this load (`server_metrics.json`), if kept."""
        import json

        f = (self.folder or self.path) / "server_metrics.json"
        return json.loads(f.read_text()) if f.is_file() else None


def load_measured(path: Path, policy: str = "fcfs", load: int | None = None) -> MeasuredRun:
    """Read a replay or serve-bench run folder, one load of it (`--load i`; a run of one load needs none)
    (EstimatorError naming what is missing)."""
    manifest = read_manifest(path)
    where = load_folder(path, load)
    try:
        workload = read_workload(where / "workload.jsonl", allow_trace=True)
    except WorkloadError as exc:
        raise EstimatorError(f"{where}: {exc}") from None
    req = served_requests(where)
    if req.empty:
        raise EstimatorError(f"{where}: no requests table (requests/*.parquet)")
    needed = [c for c in REQUEST_COLUMNS if c in ("request_id", "new_tokens", "ttft_ms", "e2e_ms")]  # what it reads
    missing = [c for c in needed if c not in req.columns]
    if missing:
        raise EstimatorError(f"{path}: requests lack column(s) {', '.join(missing)}")
    if "tpot_ms" not in req.columns:
        n = req["new_tokens"].astype(float)
        req["tpot_ms"] = np.where(n > 1, (req["e2e_ms"] - req["ttft_ms"]) / (n - 1).clip(lower=1), np.nan)
    req = req.drop_duplicates("request_id", keep="last").set_index("request_id", drop=False)
    kind = str(manifest.get("kind") or "replay")
    axes = (manifest.get("spec") or {}).get("axes") or {}
    config: dict[str, Any] = {
        k: v[0] for k, v in axes.items() if isinstance(v, list) and len(v) == 1 and k in ("tier", "top_k", "blocks")
    }
    eff = manifest.get("engine") or ((manifest.get("engine_starts") or [{}])[-1].get("effective") or {})
    if eff.get("dtype"):
        config["dtype"] = eff["dtype"]
    index = int(where.name) if where != Path(path) else 0
    return MeasuredRun(path, kind, manifest, workload, engine_config_from_manifest(manifest, policy), req, config,
                       index, where)


def paired(predicted: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Predicted and measured side by side, per request both have (`<metric>` and `<metric>_measured`)."""
    m = measured.set_index("request_id")[[c for c in (*METRICS, "queue_ms") if c in measured.columns]]
    out = predicted.merge(m, left_on="request_id", right_index=True, how="inner", suffixes=("", "_measured"))
    out = out.set_index("request_id")
    if out.empty:
        raise EstimatorError("no request in common between the simulation and the measured run")
    return out


def compare(pairs: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per metric: measured and predicted mean/p50/p90/p99, the signed error of each (%) with a 95% bootstrap
    interval over requests, and the per-request MAPE (%) with its interval."""
    rng = np.random.default_rng(seed)
    n = len(pairs)
    boots = rng.integers(0, n, size=(n_boot, n))
    out: dict[str, Any] = {"requests": n}
    for m in METRICS:
        mv = pairs[f"{m}_measured"].to_numpy(dtype=float)
        pv = pairs[m].to_numpy(dtype=float)
        ok = np.isfinite(mv) & np.isfinite(pv) & (mv > 0)
        if ok.sum() < 2:
            continue
        mv, pv = mv[ok], pv[ok]
        b = boots[:, : ok.sum()] % ok.sum()
        entry: dict[str, Any] = {}
        ape = np.abs(pv - mv) / mv * 100
        entry["mape_pct"] = _with_ci(float(ape.mean()), ape[b].mean(axis=1))
        for st in STATS:
            meas, pred = _stat(mv, st), _stat(pv, st)
            err_b = (_stat_rows(pv[b], st) - _stat_rows(mv[b], st)) / _stat_rows(mv[b], st) * 100
            entry[st] = {"measured": meas, "predicted": pred, "error_pct": _with_ci((pred - meas) / meas * 100, err_b)}
        out[m] = entry
    if "queue_ms_measured" in pairs:
        out["queue_ms"] = {
            "measured_mean": float(pairs["queue_ms_measured"].mean()),
            "predicted_mean": float(pairs["queue_ms"].mean()),
        }
    return out


def _with_ci(value: float, boot: np.ndarray) -> dict[str, float]:
    lo, hi = np.percentile(boot[np.isfinite(boot)], [2.5, 97.5]) if np.isfinite(boot).any() else (math.nan,) * 2
    return {"value": value, "lo": float(lo), "hi": float(hi)}


def _stat(v: np.ndarray, st: str) -> float:
    return float(v.mean()) if st == "mean" else float(np.percentile(v, float(st[1:])))


def _stat_rows(v: np.ndarray, st: str) -> np.ndarray:
    return v.mean(axis=1) if st == "mean" else np.percentile(v, float(st[1:]), axis=1)


def fit_overheads(
    runs: Sequence[MeasuredRun],
    model: IterationEstimator,
    config: dict[str, Any] | None = None,
    grid: int = 11,
) -> Overheads:
    """Fit the serving overheads on measured runs (a real server's, for serving; runs at different loads tell
    the per-iteration term from the per-sequence one).

    For each (per-iteration, per-sequence) pair on a grid (0 to 1.5x and 0 to 0.5x the median predicted
    iteration), the runs are simulated, and the per-request term is the median of measured - predicted TTFT
    (>= 0; it adds exactly, see estimator/sim/workload.py); the triple with the lowest mean of the TTFT and
    end-to-end MAPE wins, refined on a finer grid around it."""
    if not runs:
        raise EstimatorError("no measured run to fit the overheads on")
    probe = [run_workload(r.workload, r.engine, model, config or r.config, Overheads(), keep_steps=True) for r in runs]
    steps = [s.t_end_s - s.t_start_s for _, run in probe for s in run.steps]
    top = 1.5 * float(np.median(steps)) * 1e3 if steps else 1.0
    top_seq = top / 3

    def score(it_ms: float, seq_ms: float) -> tuple[float, Overheads, dict[str, float]]:
        frames = []
        for r in runs:
            frame, _ = run_workload(r.workload, r.engine, model, config or r.config, Overheads(it_ms, 0.0, seq_ms))
            frames.append(paired(frame, r.requests))
        pairs = pd.concat(frames)
        req_ms = max(0.0, float(np.median(pairs["ttft_ms_measured"] - pairs["ttft_ms"])))
        ttft = np.abs(pairs["ttft_ms"] + req_ms - pairs["ttft_ms_measured"]) / pairs["ttft_ms_measured"]
        e2e = np.abs(pairs["e2e_ms"] + req_ms - pairs["e2e_ms_measured"]) / pairs["e2e_ms_measured"]
        parts = {"ttft_mape_pct": float(ttft.mean() * 100), "e2e_mape_pct": float(e2e.mean() * 100)}
        return float(ttft.mean() + e2e.mean()) / 2 * 100, Overheads(it_ms, req_ms, seq_ms), parts

    best: tuple[float, Overheads, dict[str, float]] | None = None
    its, seqs = np.linspace(0.0, top, grid), np.linspace(0.0, top_seq, grid)
    for it_ms in its:  # a coarse grid, then a fine one around its best point
        for seq_ms in seqs:
            found = score(float(it_ms), float(seq_ms))
            if best is None or found[0] < best[0]:
                best = found
    assert best is not None
    d_it, d_seq = (its[1] - its[0], seqs[1] - seqs[0]) if grid > 1 else (top, top_seq)
    c_it, c_seq = best[1].iteration_ms, best[1].sequence_ms
    for it_ms in np.linspace(max(0.0, c_it - d_it), c_it + d_it, 9):
        for seq_ms in np.linspace(max(0.0, c_seq - d_seq), c_seq + d_seq, 9):
            found = score(float(it_ms), float(seq_ms))
            if found[0] < best[0]:
                best = found
    score_pct, found_oh, parts = best
    return replace(
        found_oh,
        fitted_on=", ".join(str(r.path) for r in runs),
        fit={
            "score_pct": score_pct,
            **parts,
            "grid_top_ms": top,
            "grid_points": grid,
            "requests": int(sum(len(r.workload) for r in runs)),
        },
    )


def cdf_plot(pairs: pd.DataFrame, path: Path, title: str) -> Path:
    """Predicted against measured CDFs of TTFT, TPOT and end-to-end latency, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, m in zip(axes, METRICS, strict=True):
        for col, label, style in ((f"{m}_measured", "measured", "-"), (m, "simulated", "--")):
            v = np.sort(pairs[col].dropna().to_numpy(dtype=float))
            ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), style, label=label)
        ax.set_xlabel(m.replace("_ms", " (ms)"))
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def iteration_gaps(run_dir: Path) -> pd.DataFrame:
    """Per iteration of a replay, the three parts of its wall time kept apart (ms): `engine_elapsed_ms` (the engine
    core's own), `outside_core_ms` (the rest of the step call: output processing and IPC; negative where the core's
    iteration overlapped the caller's previous call, as the engine core in its own process runs ahead), and
    `gap_before_ms` (the harness's share before it: from the previous iteration's end to this one's start while
    the engine held requests), with `batch_size` and `checkpoint_before`. Runs recorded before the harness wrote
    `gap_before_ms` get it from consecutive iterations, kept only where a request was in flight at the previous end
    (not idle)."""
    manifest = read_manifest(run_dir)
    if manifest.get("kind") != "replay":
        raise EstimatorError(f"{run_dir}: not a replay run (the gaps are the harness's, measured in replays)")
    its = read_parquet_folder(run_dir / "iterations")
    reqs = served_requests(run_dir)
    if its.empty or reqs.empty:
        raise EstimatorError(f"{run_dir}: no iterations or requests")
    out = []
    for seg, it in its.groupby("segment_id", sort=True):
        it = it.sort_values("iteration").reset_index(drop=True)
        if "gap_before_ms" not in it.columns:
            rq = reqs[reqs["segment_id"] == seg]
            arrive = np.sort(rq["arrival_t_s"].to_numpy(dtype=float))
            finish = np.sort((rq["arrival_t_s"] + rq["e2e_ms"] / 1e3).to_numpy(dtype=float))
            prev_end = it["t_end_s"].shift(1).to_numpy(dtype=float)
            held = np.searchsorted(arrive, prev_end, "left") - np.searchsorted(finish, prev_end + 1e-6, "right")
            gap = (it["t_start_s"].to_numpy(dtype=float) - prev_end) * 1e3
            it["gap_before_ms"] = np.where(np.isfinite(prev_end) & (held > 0), gap, np.nan)
            it["checkpoint_before"] = False
        it["outside_core_ms"] = it["latency_ms"] - it["engine_elapsed_ms"].astype(float)
        out.append(it[["segment_id", "iteration", "batch_size", "latency_ms", "engine_elapsed_ms", "outside_core_ms",
                       "gap_before_ms", "checkpoint_before"]].assign(run=str(run_dir)))
    return pd.concat(out, ignore_index=True)


def gap_overheads(run_dirs: Sequence[Path]) -> Overheads:
    """The serving overheads learned per iteration from replays, not fitted to request latencies: the harness's
    gap before an iteration as a + b × batch size (least squares over the busy gaps, checkpoint writes left out:
    a server does not write the harness's files), and the per-request term as the median time from a request's
    arrival to its `add_request` (`add_lag_ms`). The engine-side parts are the iteration model's."""
    if not run_dirs:
        raise EstimatorError("no replay run to learn the gaps from")
    frame = pd.concat([iteration_gaps(Path(p)) for p in run_dirs], ignore_index=True)
    use = frame[frame["gap_before_ms"].notna() & ~frame["checkpoint_before"].astype(bool)]
    if len(use) < 10:
        raise EstimatorError(f"only {len(use)} busy gaps between iterations in {', '.join(map(str, run_dirs))}")
    x = use["batch_size"].to_numpy(dtype=float)
    y = use["gap_before_ms"].to_numpy(dtype=float)
    if np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
    else:
        a, b = float(np.mean(y)), 0.0
    fit_y = a + b * x
    r2 = 1 - float(np.sum((y - fit_y) ** 2)) / max(float(np.sum((y - y.mean()) ** 2)), 1e-12)
    lags = pd.concat([served_requests(Path(p))["add_lag_ms"] for p in run_dirs]).dropna()
    return Overheads(
        iteration_ms=max(float(a), 0.0),
        request_ms=max(float(lags.median()), 0.0) if len(lags) else 0.0,
        sequence_ms=max(float(b), 0.0),
        fitted_on="per-iteration gaps of " + ", ".join(str(p) for p in run_dirs),
        fit={
            "method": "least squares of gap_before_ms on batch_size (busy gaps, no checkpoint writes)",
            "gaps": int(len(use)),
            "gap_median_ms": float(np.median(y)),
            "gap_p90_ms": float(np.percentile(y, 90)),
            "r2": r2,
            "outside_core_median_ms": float(frame["outside_core_ms"].median()),
            "engine_elapsed_median_ms": float(frame["engine_elapsed_ms"].astype(float).median()),
            "add_lag_median_ms": float(lags.median()) if len(lags) else None,
        },
    )
