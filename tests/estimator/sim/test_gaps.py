"""The time between iterations as its own term (issue 20 item 3): the harness's gap before each iteration, kept
apart from the engine core's time and the rest of the step call, and the overheads learned from it
(estimator/sim/measured.py `iteration_gaps`, `gap_overheads`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from estimator.errors import EstimatorError
from estimator.sim.measured import gap_overheads, iteration_gaps

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "replays" / "heavy-1"


def _run(tmp_path: Path, iterations: list[dict], requests: list[dict], name: str = "r") -> Path:
    run = tmp_path / name
    run.mkdir()
    shutil.copy(FIXTURE / "manifest.json", run / "manifest.json")
    (run / "iterations").mkdir()
    (run / "requests").mkdir()
    pd.DataFrame(iterations).assign(segment_id="seg-000").to_parquet(run / "iterations" / "seg-000.parquet")
    pd.DataFrame(requests).assign(segment_id="seg-000").to_parquet(run / "requests" / "seg-000.parquet")
    return run


def _it(i: int, start: float, end: float, batch: int, core_ms: float) -> dict:
    return {"iteration": i, "t_start_s": start, "t_end_s": end, "latency_ms": (end - start) * 1e3,
            "engine_elapsed_ms": core_ms, "batch_size": batch}


def test_gaps_of_an_old_run_count_only_while_a_request_was_in_flight(tmp_path: Path) -> None:
    # a: arrives at 0, tokens at 0.010 and 0.022; b: arrives at 0.005, tokens at 0.022 and 0.033 (the end);
    # c: arrives at 1.0 after the engine was idle, one token at 1.01
    its = [_it(0, 0.000, 0.010, 1, 8.0), _it(1, 0.012, 0.022, 2, 9.0), _it(2, 0.0235, 0.033, 1, 8.5),
           _it(3, 1.000, 1.010, 1, 8.0)]
    reqs = [{"request_id": "a", "arrival_t_s": 0.0, "e2e_ms": 22.0, "add_lag_ms": 0.1},
            {"request_id": "b", "arrival_t_s": 0.005, "e2e_ms": 28.0, "add_lag_ms": 0.3},
            {"request_id": "c", "arrival_t_s": 1.0, "e2e_ms": 10.0, "add_lag_ms": 0.2}]
    gaps = iteration_gaps(_run(tmp_path, its, reqs))
    assert gaps["gap_before_ms"].tolist()[1:3] == pytest.approx([2.0, 1.5])
    assert gaps["gap_before_ms"].isna().tolist() == [True, False, False, True]  # first; after an idle engine
    assert gaps["outside_core_ms"].tolist() == pytest.approx([2.0, 1.0, 1.0, 2.0])


def test_learned_overheads_fit_the_gap_per_iteration_and_sequence(tmp_path: Path) -> None:
    # gaps 0.5 + 0.25 x batch exactly, one checkpoint write (10 ms) that must not count
    its, t = [], 0.0
    for i, b in enumerate([1, 2, 3, 4, 2, 3, 1, 4, 2, 3, 4, 1]):
        gap = 0.0 if i == 0 else (0.5 + 0.25 * b) / 1e3 + (0.010 if i == 5 else 0.0)
        its.append({**_it(i, t + gap, t + gap + 0.005, b, 4.0), "gap_before_ms": None if i == 0 else gap * 1e3,
                    "checkpoint_before": i == 5})
        t += gap + 0.005
    reqs = [{"request_id": "a", "arrival_t_s": 0.0, "e2e_ms": t * 1e3, "add_lag_ms": 0.4}]
    found = gap_overheads([_run(tmp_path, its, reqs)])
    assert found.iteration_ms == pytest.approx(0.5) and found.sequence_ms == pytest.approx(0.25)
    assert found.request_ms == pytest.approx(0.4) and found.fit["gaps"] == 10 and found.fit["r2"] == pytest.approx(1)
    assert found.fitted_on.startswith("per-iteration gaps of ")


def test_a_recorded_replay_gives_busy_gaps_and_a_served_run_is_refused(tmp_path: Path) -> None:
    gaps = iteration_gaps(FIXTURE)
    busy = gaps["gap_before_ms"].dropna()
    assert len(busy) > 0.9 * len(gaps) and (busy > 0).all()
    # the rest of the step call is positive as a rule; where the core's iteration overlapped the caller's previous
    # call (multiprocess: the core runs ahead), its elapsed time exceeds the call and the difference is negative
    assert gaps["outside_core_ms"].median() > 0 and (gaps["outside_core_ms"] > 0).mean() > 0.7
    run = tmp_path / "served"
    shutil.copytree(FIXTURE, run)
    m = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**m, "kind": "serve-bench"}))
    with pytest.raises(EstimatorError, match="not a replay run"):
        iteration_gaps(run)
