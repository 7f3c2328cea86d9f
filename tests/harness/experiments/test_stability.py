"""The stability study (harness/experiments/stability.py): its interleaved order, resume state, statistics and
CLI errors. Its real runs are measurements (studies/stability/), not tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli.app import app
from harness.experiments import stability as st


def test_every_round_runs_every_arm_once_in_its_own_seeded_order() -> None:
    arms = list(st.ARMS)
    orders = [st.round_order(arms, r, 45) for r in range(8)]
    assert all(sorted(o) == sorted(arms) for o in orders)
    assert orders[3] == st.round_order(arms, 3, 45)  # a resumed study keeps its order
    assert len({tuple(o) for o in orders}) > 1 and len({o[0] for o in orders}) > 1  # no arm always first


def test_the_aa_pair_and_every_arm_are_environments() -> None:
    assert st.ARMS["today"].env == st.ARMS["today-b"].env == {st.STEADY_ENV: "0"}
    assert st.ARMS["adopted"].env == {}  # the harness's defaults
    assert st.ARMS["inprocess"].args == ("--inprocess",) and st.ARMS["inprocess"].changes == "what computes"
    assert st.ARMS["preload"].changes == "what computes"
    assert set(st.SERVED_ARMS) <= set(st.ARMS)


def _rows(levels: dict[str, list[float]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for arm, xs in levels.items():
        for r, x in enumerate(xs):
            rows.append({"path": "step", "round": r, "arm": arm, "status": "ok", "decode_median_ms": x,
                         "prefill512_median_ms": 10 * x, "decode_same_prompt_cv_pct": 10.0 + r,
                         "prefill_same_prompt_cv_pct": 5.0, "compute_wait_ms": 2.0 * r,
                         "canary_decode_before_ms": 1.0 + 0.01 * r, "canary_decode_after_ms": 1.0})
    return rows


def test_the_summary_gives_each_arms_spread_with_an_interval_and_its_level_against_today() -> None:
    rng = np.random.default_rng(1)
    today = list(np.exp(rng.normal(np.log(3.0), 0.2, 12)))
    steady = list(np.exp(rng.normal(np.log(2.4), 0.02, 12)))
    rows = _rows({"today": today, "placed": steady})
    rows.append({"path": "step", "round": 0, "arm": "thp", "status": "failed", "error": "exit code 1"})
    out = st.summarize(rows, "step", seed=3)
    assert out["starts_ok"] == 24 and out["starts_failed"] == 1
    t, p = out["arms"]["today"]["decode_median_ms"], out["arms"]["placed"]["decode_median_ms"]
    assert t["sd_log"] == pytest.approx(float(np.std(np.log(today), ddof=1)), abs=1e-4)
    assert t["sd_log_95"][0] <= t["sd_log"] <= t["sd_log_95"][1]
    assert p["sd_log_95"][1] < t["sd_log_95"][0]  # the steadier arm's interval lies below
    ratio, lo, hi = p["vs_today"]
    assert ratio == pytest.approx(math.exp(np.mean(np.log(steady)) - np.mean(np.log(today))), abs=1e-3)
    assert lo < ratio < hi < 1
    assert "vs_today" not in t
    assert out["arms"]["placed"]["decode_same_prompt_cv_pct"]["median"] == pytest.approx(15.5)
    assert out["canary"]["starts"] == 24


def test_analyze_writes_json_and_a_figure_and_skips_a_cut_line(tmp_path: Path) -> None:
    rows = _rows({"today": [3.0, 3.3, 2.9], "today-b": [3.1, 2.8, 3.2]})
    (tmp_path / st.STARTS).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"path": "st')
    lines: list[str] = []
    res = st.analyze_stability(tmp_path, lines.append)
    assert set(res["paths"]) == {"step"} and res["paths"]["step"]["starts_ok"] == 6
    assert json.loads((tmp_path / st.RESULTS).read_text())["schema"] == "stability/1"
    assert (tmp_path / st.FIGURE).stat().st_size > 1000
    assert any(line.strip().startswith("today-b") and "vs today" in line for line in lines)


@pytest.mark.parametrize("args, why", [
    (["--arms", "today,warp"], "unknown arm"),
    (["--arms", "today"], "at least two arms"),
    (["--path", "gpu"], "--path"),
    (["--rounds", "0"], "--rounds"),
    (["--analyze"], "no starts.jsonl"),
])
def test_bad_study_input_is_one_line(args: list[str], why: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["experiment", "stability", "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2
    text = (result.stdout + result.stderr).strip()
    assert len(text.splitlines()) == 1 and why in text and "Traceback" not in text
    assert not (tmp_path / "s" / st.STARTS).exists()
