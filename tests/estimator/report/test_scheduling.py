"""The report's scheduling section from the scheduler experiment's results.json (report/sections/scheduling.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from estimator.errors import EstimatorError
from estimator.report.build import load_scheduling
from estimator.report.document import Figure, Note, Table
from estimator.report.sections.scheduling import scheduling_section


def _results() -> dict:
    rows = [
        {"policy": p, "mult": m, "seed": s, "rate_rps": 10 * m, "attainment": a, "rejected": r,
         "e2e_mean_ms": 100.0, "e2e_p99_ms": 300.0, "ttft_p99_ms": 50.0, "decision_us": d}
        for p, base, r, d in (("fcfs", 0.9, 0.0, 0.0), ("estimate-admit", 1.0, 0.05, 400.0))
        for s in (1, 2)
        for m, a in ((0.5, base), (1.0, base - 0.3))
    ]
    good = [
        {"policy": "fcfs", "goodput_rps": [5.0, 5.0], "goodput_mean_rps": 5.0, "goodput_t95": [5.0, 5.0],
         "ratio_to_fcfs": [1.0, 1.0], "ratio_t95": [1.0, 1.0, 1.0], "ratio_bootstrap95": [1.0, 1.0],
         "censored": [False, False], "decision_us": 0.0},
        {"policy": "estimate-admit", "goodput_rps": [8.0, 9.0], "goodput_mean_rps": 8.5, "goodput_t95": [2.1, 14.9],
         "ratio_to_fcfs": [1.6, 1.8], "ratio_t95": [1.7, 0.43, 2.97], "ratio_bootstrap95": [1.2, 2.1],
         "censored": [False, True], "decision_us": 400.0, "ratio_to_prompt_t95": [1.3, 1.1, 1.5],
         "long_class_max_wait_ms": 1234.4},
    ]
    setup = {"capacity_rps": 10.0, "slo_scale": 5, "slo_scale_rule": "given", "count": 80, "max_num_seqs": 4,
             "engine": {"dtype": "float32"},
             "slo": {"short": {"ttft_ms": 80.0, "tpot_ms": 30.0}, "long": {"ttft_ms": 900.0, "tpot_ms": 31.0}}}
    sim = [{"policy": "fcfs", "mult": 0.5, "seed": 1, "attainment": 0.96}]
    return {"setup": setup, "rows": rows, "goodput": good, "simulated": sim}


def test_section_tables_the_goodput_with_its_intervals_and_draws_attainment(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()))
    sec = scheduling_section(load_scheduling(path))
    tables = [b for b in sec.blocks if isinstance(b, Table)]
    goodput = tables[0]
    assert goodput.rows[1][0] == "estimate-admit"
    assert goodput.rows[1][1] == "8.50 [2.10, 14.90] ≥"  # censored in one seed
    assert goodput.rows[1][4] == "[1.20, 2.10]" and goodput.rows[1][5] == "5.0"
    assert goodput.rows[1][6:] == ["[1.10, 1.50]", "400", "1234"]  # x prompt, decision, the long class's wait
    assert goodput.rows[0][6:] == ["–", "0", "–"]  # results written before mixes have neither
    assert any("SIMULATED" in t.columns[0] for t in tables)
    (fig,) = [b for b in sec.blocks if isinstance(b, Figure)]
    assert fig.png.startswith(b"\x89PNG")


def test_missing_or_foreign_results_are_a_note_or_one_line(tmp_path: Path) -> None:
    assert isinstance(scheduling_section(None).blocks[0], Note)
    bad = tmp_path / "x.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(EstimatorError, match="not the scheduler experiment's results"):
        load_scheduling(bad)
    assert scheduling_section("x: bad json").blocks[0].text == "Scheduler results unreadable: x: bad json"
