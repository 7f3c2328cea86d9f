"""`estimate simulate`: a whole workload predicted from its arrivals alone, with the scheduler replica
(estimator/sim/scheduler.py), the iteration model, and the serving overheads fitted on a real server.

Metric definitions are vLLM's benchmark's (`vllm/benchmarks/serve.py`, `calculate_metrics`): TTFT is arrival to the
first token as the client receives it; TPOT is (end-to-end - TTFT) / (output tokens - 1), the first token
excluded; ITL the gaps between tokens; end-to-end the request's whole latency. Queueing is arrival to the first
iteration that processed the request.

Overheads (`serving.json` beside the model, from `estimate simulate --fit-overheads RUN`):
- `iteration_ms`: added to every iteration: what the server (or the harness) does between two engine steps
  (scheduling, output processing), which the iteration model (a step's own time) leaves out;
- `sequence_ms`: added to an iteration per request in it: the work that grows with the batch (detokenising and
  streaming each request's token; on a CPU box the API server also takes cores from the engine);
- `request_ms`: added once to each request's TTFT and end-to-end: HTTP, tokenising, detokenising, the client.
  A constant delay of every arrival leaves the schedule unchanged, so it adds exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract.request import EngineLimits, Request
from contract.slo import meets_slo
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.sim.scheduler import EngineConfig, Frontend, IterationFn, SimulationError, SimulationRun, simulate

SERVING_FILE = "serving.json"
METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")
STATS = ("mean", "p50", "p90", "p99")


@dataclass(frozen=True)
class Overheads:
    """Serving overheads (ms) added to the replica's engine-side times (see the module docstring)."""

    iteration_ms: float = 0.0
    request_ms: float = 0.0
    sequence_ms: float = 0.0
    fitted_on: str | None = None
    fit: dict[str, Any] | None = None

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (SERVING_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, folder / SERVING_FILE)
        return folder / SERVING_FILE

    @classmethod
    def load(cls, folder: Path) -> Overheads:
        """The folder's `serving.json`, or no overheads when there is none."""
        path = Path(folder) / SERVING_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            out = cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise EstimatorError(f"{path}: unreadable serving overheads ({exc})") from exc
        if not all(math.isfinite(v) and v >= 0 for v in (out.iteration_ms, out.request_ms, out.sequence_ms)):
            raise EstimatorError(f"{path}: overheads must be finite and >= 0")
        return out


def engine_config_from_manifest(manifest: dict[str, Any], policy: str = "fcfs") -> EngineConfig:
    """The replica's settings from a run's last engine start (`engine_starts[-1].effective`, or a serve-bench
    run's `engine`)."""
    eff = manifest.get("engine") or ((manifest.get("engine_starts") or [{}])[-1].get("effective") or {})
    missing = EngineLimits.missing(eff)
    if missing:
        raise EstimatorError(f"the run's manifest does not record the engine's {', '.join(missing)}")
    limits = EngineLimits.from_effective(eff)
    return EngineConfig(**asdict(limits), policy="priority" if policy == "priority" else "fcfs")


def iteration_fn(model: IterationEstimator, config: dict[str, Any], scale: float = 1.0) -> IterationFn:
    """The iteration model of one config as a plain function of the composition (no validation per call),
    times `scale` (1: as trained; an engine start measured faster or slower, see docs/simulate.md)."""
    a, b, c, d, e, f = (v * scale for v in model.coefficients(config))

    def ms(pre_tokens: int, pre_sq: float, n_dec: int, ctx_sum: int, ctx_max: int) -> float:
        return a + b * pre_tokens + c * pre_sq + d * n_dec + e * ctx_sum + f * (n_dec * ctx_max - ctx_sum)

    return ms


def arrivals_of(requests: Sequence[Request], priorities: Sequence[int] | None = None) -> list[Request]:
    """The replica's arrivals; each priority from `priorities`, else the workload's own `priority`, else 0."""
    if priorities is None:
        return list(requests)
    return [r.declaring(priority=priorities[i]) for i, r in enumerate(requests)]


def request_frame(run: SimulationRun, overheads: Overheads) -> pd.DataFrame:
    """Per request: queue, TTFT, TPOT, end-to-end (ms, vLLM's benchmark's definitions), token times, preemptions;
    with a front end also `frontend_ms` (arrival to the engine), `engine_queue_ms` (from there to the first step
    that held it), `server_queue_ms` (from the engine taking it into its waiting queue, between iterations, to that
    step: the server's `vllm:request_queue_time_seconds`) and `server_ttft_ms` (from reaching the engine to the
    first token streamed, as `vllm:time_to_first_token_seconds`)."""
    rows = []
    extra = overheads.request_ms
    for tr in run.requests:
        a = tr.request
        arrival = a.arrival_s
        times = tr.client_times_s
        ttft = (times[0] - arrival) * 1e3 + extra
        e2e = (times[-1] - arrival) * 1e3 + extra
        rows.append(
            {
                "request_id": a.request_id,
                "arrival_s": a.arrival_s,
                "prompt_tokens": a.text_tokens,
                "output_tokens": a.output_tokens,
                "priority": a.priority or 0,
                "queue_ms": ((tr.first_scheduled_s or a.arrival_s) - a.arrival_s) * 1e3,
                "ttft_ms": ttft,
                "tpot_ms": (e2e - ttft) / (a.output_tokens - 1) if a.output_tokens > 1 else math.nan,
                "e2e_ms": e2e,
                "preemptions": tr.preemptions,
                "token_times_ms": [round((t - arrival) * 1e3 + extra, 4) for t in times],
                **_server_side(tr),
            }
        )
    return pd.DataFrame(rows)


def _server_side(tr: Any) -> dict[str, float]:
    ready = tr.ready_s if tr.ready_s is not None else tr.request.arrival_s
    first = tr.first_scheduled_s if tr.first_scheduled_s is not None else ready
    queued = tr.queued_s if tr.queued_s is not None else ready
    return {
        "frontend_ms": (ready - tr.request.arrival_s) * 1e3,
        "engine_queue_ms": (first - ready) * 1e3,
        "server_queue_ms": (first - queued) * 1e3,
        "server_ttft_ms": (tr.client_times_s[0] - ready) * 1e3 if tr.client_times_s else math.nan,
    }


def summarize(frame: pd.DataFrame, span_s: float | None = None) -> dict[str, Any]:
    """mean/p50/p90/p99 of TTFT, TPOT and end-to-end (ms), and throughput (requests/s, output tokens/s)."""
    out: dict[str, Any] = {"requests": len(frame)}
    for m in ("queue_ms", *METRICS):
        v = frame[m].dropna().to_numpy(dtype=float) if m in frame else np.array([])
        out[m] = {s: _stat(v, s) for s in STATS}
    if span_s is None and len(frame):
        span_s = float((frame["arrival_s"] + frame["e2e_ms"] / 1e3).max() - frame["arrival_s"].min())
    if span_s:
        out["throughput_rps"] = len(frame) / span_s
        out["output_tokens_per_s"] = float(frame["output_tokens"].sum()) / span_s
    return out


def _stat(v: np.ndarray, stat: str) -> float:
    if not len(v):
        return math.nan
    if stat == "mean":
        return float(v.mean())
    return float(np.percentile(v, float(stat[1:])))


def run_workload(
    requests: Sequence[Request],
    engine: EngineConfig,
    model: IterationEstimator,
    config: dict[str, Any],
    overheads: Overheads,
    priorities: Sequence[int] | None = None,
    keep_steps: bool = False,
    scale: float = 1.0,
    frontend: Frontend | None = None,
    level_at: Callable[[float], float] | None = None,
) -> tuple[pd.DataFrame, SimulationRun]:
    """Simulate `requests` on `engine` with the iteration model of `config` (times `scale`), the overheads and the
    front end's queue (estimator/sim/scheduler.py), and `level_at(t)` (s of the run -> a further factor) where the
    level moves over the run; the per-request frame and the run."""
    try:
        run = simulate(
            arrivals_of(requests, priorities),
            engine,
            iteration_fn(model, config, scale),
            overheads.iteration_ms,
            overheads.sequence_ms,
            keep_steps=keep_steps,
            frontend=frontend,
            level_at=level_at,
        )
    except SimulationError as exc:
        raise EstimatorError(str(exc)) from None
    return request_frame(run, overheads), run


def slo_attainment(frame: pd.DataFrame, slo_ttft_ms: float, slo_tpot_ms: float) -> float:
    """Share of requests meeting both SLOs (contract/slo.py `meets_slo`: a one-token request has no TPOT and meets
    that one)."""
    ok = [meets_slo(float(t), None if pd.isna(p) else float(p), slo_ttft_ms, slo_tpot_ms)
          for t, p in zip(frame["ttft_ms"], frame["tpot_ms"], strict=True)]
    return float(np.mean(ok)) if len(frame) else math.nan


def capacity_curve(
    rates: Sequence[float],
    make_requests: Callable[[float], Sequence[Request]],
    simulate_one: Callable[[Sequence[Request]], pd.DataFrame],
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
) -> pd.DataFrame:
    """One row per rate: the aggregates, and SLO attainment where SLOs are given."""
    rows = []
    for rate in rates:
        frame = simulate_one(make_requests(rate))
        s = summarize(frame)
        row: dict[str, Any] = {"rate_rps": rate, "throughput_rps": s.get("throughput_rps")}
        for m in METRICS:
            for st in STATS:
                row[f"{m}_{st}"] = s[m][st]
        if slo_ttft_ms is not None and slo_tpot_ms is not None:
            row["slo_attainment"] = slo_attainment(frame, slo_ttft_ms, slo_tpot_ms)
        rows.append(row)
    return pd.DataFrame(rows)
