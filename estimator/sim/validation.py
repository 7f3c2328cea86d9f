"""The simulator judged on measured workloads it never saw (replays and live servers): one typed row per run and
per workload kind, saved as JSON for the report (`estimate report --simulation FILE`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from estimator.data.runs import run_loads
from estimator.errors import EstimatorError, one_line_validation_error
from estimator.model.iteration import IterationEstimator
from estimator.sim.measured import compare, load_measured, paired
from estimator.sim.workload import Overheads, run_workload, slo_attainment
from estimator.strict import StrictModel

TARGETS = {"e2e": 5.0, "ttft": 10.0}  # issue 21: E2E mean/p90/p99 error <= 5%, TTFT mean/p90 <= 10%


class Interval(StrictModel):
    value: float
    lo: float
    hi: float


class SimulationRow(StrictModel):
    """The simulator against one measured run (or all seeds of one workload kind): errors in %, with 95%
    bootstrap intervals over requests; SLO attainment (%) at SLOs of 2x the measured median TTFT and TPOT."""

    name: str
    source: str  # replay | serve-bench
    requests: int
    e2e_mape: Interval
    ttft_mape: Interval
    e2e: dict[str, Interval]  # mean, p50, p90, p99: signed error of the statistic
    ttft: dict[str, Interval]
    tpot: dict[str, Interval]
    slo_ttft_ms: float
    slo_tpot_ms: float
    slo_measured_pct: float
    slo_simulated_pct: float
    queue_measured_ms: float | None = None
    queue_simulated_ms: float | None = None

    def meets_targets(self) -> bool:
        e2e = all(abs(self.e2e[s].value) <= TARGETS["e2e"] for s in ("mean", "p90", "p99"))
        return e2e and all(abs(self.ttft[s].value) <= TARGETS["ttft"] for s in ("mean", "p90"))


class SimulationValidation(StrictModel):
    model: str
    overheads: dict[str, float | str | None]
    rows: list[SimulationRow]


def row_of(name: str, source: str, pairs: pd.DataFrame) -> SimulationRow:
    c = compare(pairs)

    def stats(metric: str) -> dict[str, Interval]:
        return {s: Interval(**c[metric][s]["error_pct"]) for s in ("mean", "p50", "p90", "p99")}

    slo_ttft = 2 * float(pairs["ttft_ms_measured"].median())
    slo_tpot = 2 * float(pairs["tpot_ms_measured"].median())
    measured = pairs[["ttft_ms_measured", "tpot_ms_measured"]].set_axis(["ttft_ms", "tpot_ms"], axis=1)
    queue = c.get("queue_ms") or {}
    return SimulationRow(
        name=name,
        source=source,
        requests=c["requests"],
        e2e_mape=Interval(**c["e2e_ms"]["mape_pct"]),
        ttft_mape=Interval(**c["ttft_ms"]["mape_pct"]),
        e2e=stats("e2e_ms"),
        ttft=stats("ttft_ms"),
        tpot=stats("tpot_ms"),
        slo_ttft_ms=slo_ttft,
        slo_tpot_ms=slo_tpot,
        slo_measured_pct=slo_attainment(measured, slo_ttft, slo_tpot) * 100,
        slo_simulated_pct=slo_attainment(pairs, slo_ttft, slo_tpot) * 100,
        queue_measured_ms=queue.get("measured_mean"),
        queue_simulated_ms=queue.get("predicted_mean"),
    )


def engine_start_scale(run_dir: Path, model: IterationEstimator, config: dict[str, object]) -> float:
    """How much slower (> 1) or faster this replay's engine start ran than the model says: the median of measured /
    predicted over its decode-only iterations. An oracle (it reads the run being predicted): it measures how much
    of the error is the engine start's own speed, which composition cannot predict."""
    import numpy as np

    from estimator.data.iterations import load_iteration_runs, with_derived

    frame = with_derived(load_iteration_runs([run_dir]))
    decode = frame[frame["num_prefill_seqs"] == 0]
    if decode.empty:
        return 1.0
    predicted = model.predict_frame(decode)
    return float(np.median(decode["latency_ms"].to_numpy() / predicted))


def validate_simulation(
    model_dir: Path, runs: Sequence[Path], calibrate: bool = False, load: int | None = None
) -> tuple[SimulationValidation, dict[str, pd.DataFrame]]:
    """Simulate each run's workload on its engine with the model (and its serving.json), compare; rows per run
    (per load of a serve-bench run of several: `load`, or every one), then per workload kind (the run folder's name
    up to its last '-', all seeds pooled). Also returns the pooled request pairs per kind (for CDF plots).
    `calibrate` (replays only): the iteration model scaled by each run's `engine_start_scale`, the oracle experiment
    of docs/simulate.md."""
    model = IterationEstimator.load(model_dir)
    overheads = Overheads.load(model_dir)
    rows: list[SimulationRow] = []
    pooled: dict[str, list[pd.DataFrame]] = {}
    sources: dict[str, str] = {}
    for path, i in [(p, i) for p in runs for i in ([load] if load is not None else run_loads(p))]:
        m = load_measured(path, load=i)
        name = m.label
        scale = engine_start_scale(path, model, m.config) if calibrate and m.kind == "replay" else 1.0
        sim, _ = run_workload(m.workload, m.engine, model, m.config, overheads, scale=scale)
        pairs = paired(sim, m.requests)
        key = f"{m.kind}:{path.name.rsplit('-', 1)[0]}"
        pooled.setdefault(key, []).append(pairs)
        sources[key] = m.kind
        rows.append(row_of(name + (f" (x{scale:.2f})" if scale != 1.0 else ""), m.kind, pairs))
    joined = {k: pd.concat(v) for k, v in pooled.items()}
    for key, pairs in joined.items():
        if len(pooled[key]) > 1:
            rows.append(row_of(f"{key.split(':', 1)[1]} (all seeds)", sources[key], pairs))
    result = SimulationValidation(
        model=str(model_dir),
        overheads={
            "iteration_ms": overheads.iteration_ms,
            "request_ms": overheads.request_ms,
            "sequence_ms": overheads.sequence_ms,
            "fitted_on": overheads.fitted_on,
        },
        rows=rows,
    )
    return result, joined


def save_validation(result: SimulationValidation, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=1) + "\n")
    return path


def load_validation(path: Path) -> SimulationValidation:
    try:
        return SimulationValidation.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise EstimatorError(f"{path}: not a simulation validation ({one_line_validation_error(exc)})") from None
        raise EstimatorError(f"{path}: unreadable ({exc})") from None


def ci_text(iv: Interval) -> str:
    if not math.isfinite(iv.value):
        return "–"
    return f"{iv.value:+.1f} [{iv.lo:+.1f}, {iv.hi:+.1f}]"
