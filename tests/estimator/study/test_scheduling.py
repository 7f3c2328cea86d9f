"""The scheduler experiment's estimator side (estimator/study/scheduling.py) and its traces (contract/workload.py
`bimodal`): one goodput definition (contract/slo.py), SLOs met per class, the estimate policy's own priorities,
and the goodput of a stored results file recomputed from its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from contract.slo import Goodput, goodput, meets_slo
from contract.workload import LONG_PROMPT_MIN, bimodal
from estimator.errors import EstimatorError
from estimator.model.iteration import ITERATION_FORMAT, TERMS, IterationConfigFit, IterationEstimator, IterationMeta
from estimator.sim.policies import EstimatePolicy
from estimator.study.scheduling import met, regoodput

ROOT = Path(__file__).resolve().parents[3]
ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 2048, "block_size": 128, "num_gpu_blocks": 256,
          "max_model_len": 4096}


def test_traces_are_shared_by_policies_and_rates() -> None:
    a, b = bimodal(5.0, 50, 1), bimodal(5.0, 50, 1)
    assert a == b and bimodal(5.0, 50, 2) != a
    assert {r.text_tokens >= LONG_PROMPT_MIN for r in a} == {True, False}
    slow, fast = bimodal(2.0, 30, 4), bimodal(6.0, 30, 4)
    assert [(r.text_tokens, r.output_tokens) for r in slow] == [(r.text_tokens, r.output_tokens) for r in fast]
    assert [round(r.arrival_s / 3, 6) for r in slow] == pytest.approx([r.arrival_s for r in fast], abs=2e-6)
    assert all(r.max_tokens == r.output_tokens for r in a)  # each client declares its true length


def test_estimate_orders_by_its_own_predicted_latency_alone(tmp_path: Path) -> None:
    meta = IterationMeta(
        format_version=ITERATION_FORMAT, created_at="x", runs=["r"], config_columns=["tier"], terms=list(TERMS),
        configs=[IterationConfigFit(config={"tier": 0}, rows=1, coef_ms=[5.0, 0.1, 0.0, 0.5, 0.001, 0.0])],
        rows=1, composition_range={},
    )
    IterationEstimator(meta).save(tmp_path / "m")
    policy = EstimatePolicy(tmp_path / "m", {"tier": 0})
    policy.start(ENGINE, {"tier": 0})
    a = bimodal(5.0, 50, 1)
    prio = [policy.alone_us(r.declared) for r in a]
    longest = max(range(len(a)), key=lambda i: a[i].text_tokens * 0.1 + a[i].max_tokens * 5.5)
    assert prio[longest] == max(prio)  # the longest predicted request goes last


def test_one_goodput_interpolates_the_crossing() -> None:
    # attainment 1.0, 0.95, 0.7 at 2, 4, 6 req/s: 90% is crossed at 4 + 2 * (0.95 - 0.9) / (0.95 - 0.7)
    assert goodput([2, 4, 6], [1.0, 0.95, 0.7]) == Goodput(pytest.approx(4.4))
    assert goodput([2, 4, 6], [0.8, 0.95, 0.99]) == Goodput(0.0)  # the lowest rate fails: nothing counts
    assert goodput([2, 4], [0.95, 0.92]) == Goodput(4, censored=True)  # censored at the highest rate
    assert goodput([2, 4, 6], [0.95, float("nan"), 1.0]) == Goodput(2)  # a rate with no answer ends it
    with pytest.raises(ValueError, match="3 rates but 2"):
        goodput([1, 2, 3], [1.0, 1.0])


def test_a_request_meets_its_class_slo() -> None:
    assert meets_slo(90, None, 100, 10) and not meets_slo(90, 11, 100, 10) and not meets_slo(90, 1, 100, 10, False)
    slo = {"short": {"ttft_ms": 100.0, "tpot_ms": 10.0}, "long": {"ttft_ms": 500.0, "tpot_ms": 20.0}}
    frame = pd.DataFrame({"text_tokens": [50, 50, 900, 900, 50], "new_tokens": [5, 1, 5, 5, 5],
                          "ttft_ms": [90, 90, 400, 600, float("nan")],
                          "tpot_ms": [9, float("nan"), 25, 1, float("nan")],
                          "rejected": [False, False, False, False, True]})
    assert list(met(frame, slo)) == [True, True, False, False, False]  # a rejected request misses


def test_the_published_goodput_is_recomputed_from_its_rows() -> None:
    stored = json.loads((ROOT / "docs" / "simulate" / "scheduler-results.json").read_text())
    again, lines = regoodput(stored)
    assert len(lines) == len(stored["goodput"]) and all(line.endswith("[as stored]") for line in lines)
    changed = {**stored, "rows": [{**r, "attainment": 1.0} if r["policy"] == "prompt" else r for r in stored["rows"]]}
    _, lines = regoodput(changed)
    assert any("prompt" in line and "moved: goodput_rps" in line for line in lines)
    assert again["goodput"][0]["policy"] == "fcfs"


def test_the_rows_are_kept_compact_so_a_clone_without_raw_cells_reruns(tmp_path: Path) -> None:
    from estimator.study.scheduling import ROW_COLUMNS, classes, request_rows

    raw = tmp_path / "raw"
    raw.mkdir()
    cell = pd.DataFrame({"request_id": ["req-00000", "req-00001"], "text_tokens": [600, 60], "new_tokens": [5, 80],
                         "max_tokens": [256, 256], "client_class": ["code", "chat"], "ttft_ms": [20.0, 5.0],
                         "e2e_ms": [30.0, 200.0], "tpot_ms": [2.5, 2.4], "priority": [1, 2],
                         "decision_us": [300.0, 310.0], "rejected": [False, False], "rejected_reason": ["", ""],
                         "token_times_ms": [[20.0, 30.0], [5.0, 200.0]], "policy": "estimate", "mult": 0.5, "seed": 1})
    cell.to_parquet(raw / "estimate-0.5-1.parquet")
    assert len(request_rows(tmp_path)) == 2
    compact = pd.read_parquet(tmp_path / "requests.parquet")
    assert list(compact.columns) == list(ROW_COLUMNS)  # the per-token times stay in raw/
    for p in raw.iterdir():
        p.unlink()
    again = request_rows(tmp_path)
    assert list(classes(again)) == ["code", "chat"] and again["e2e_ms"].tolist() == [30.0, 200.0]
    # a cell measured since (raw/) joins the kept ones; a cell in both is read from raw/ once
    cell.assign(policy="fcfs").to_parquet(raw / "fcfs-0.5-1.parquet")
    cell.assign(e2e_ms=[31.0, 201.0]).to_parquet(raw / "estimate-0.5-1.parquet")
    both = request_rows(tmp_path)
    assert sorted(both["policy"]) == ["estimate", "estimate", "fcfs", "fcfs"]
    assert sorted(both[both.policy == "estimate"]["e2e_ms"]) == [31.0, 201.0]
    for p in raw.iterdir():
        p.unlink()
    (tmp_path / "requests.parquet").unlink()
    with pytest.raises(EstimatorError, match="holds no request rows"):
        request_rows(tmp_path)
