"""The simulator judged on recorded replays (tests/fixtures/replays), rows saved and read back, and the report
section that shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator.errors import EstimatorError
from estimator.model.iteration import train_iteration_estimator
from estimator.report.sections.simulation import simulation_section
from estimator.sim.validation import load_validation, save_validation, validate_simulation

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "replays"


def test_validation_rows_round_trip_and_render(tmp_path: Path) -> None:
    model = tmp_path / "model"
    train_iteration_estimator([FIXTURES / "heavy-1"], model)  # trained on one replay, judged on the other
    result, pooled = validate_simulation(model, [FIXTURES / "bursty-1"])
    (row,) = result.rows
    assert row.name == "bursty-1" and row.source == "replay" and row.requests == 120
    assert row.e2e["p90"].lo <= row.e2e["p90"].value <= row.e2e["p90"].hi
    assert 0 <= row.slo_measured_pct <= 100 and row.queue_measured_ms is not None
    assert set(pooled) == {"replay:bursty"}
    path = save_validation(result, tmp_path / "v.json")
    back = load_validation(path)
    assert back == result
    section = simulation_section(back)
    table = next(b for b in section.blocks if hasattr(b, "rows"))
    assert table.rows[0][0] == "bursty-1" and table.rows[0][-1] in ("met", "missed")


def test_a_bad_validation_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "v.json"
    bad.write_text('{"model": "m"}')
    with pytest.raises(EstimatorError, match="not a simulation validation"):
        load_validation(bad)
    assert "unreadable" in simulation_section("unreadable: x").blocks[0].text  # type: ignore[union-attr]
