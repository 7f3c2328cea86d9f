"""The budgeted sweep's planning and refinement choice (harness/drivers/budget.py, adaptive.py), without an engine;
the real budgeted sweep is tests/harness/drivers/test_budget_sweep.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli.app import app
from harness.drivers.adaptive import candidates, choose, rank
from harness.drivers.budget import CostCache, coarse_lengths, cost_key, plan_budget, request_cost, start_cost
from harness.drivers.plan import plan_sweep
from harness.rundata.spec import SpecError, build_spec, parse_duration

runner = CliRunner()


def _plan(**extra: object):  # the embedded CPU default's grid
    return plan_sweep(build_spec({"budget": "3m", **extra}))


def _cache(tmp_path: Path, start_s: float | None = None, request_s: float | None = None) -> CostCache:
    cache = CostCache(tmp_path / "costs.json")
    plan = _plan()
    for tier in (0, 1, 2):
        cache.record(cost_key(plan, tier), start_s=start_s, request_s=request_s, request_text_tokens=356)
    return cache


@pytest.mark.parametrize(("text", "seconds"), [("4m", 240), ("90s", 90), ("1h30m", 5400), ("240", 240), ("2.5m", 150)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["x", "0", "4mm", "-3", "m4"])
def test_bad_budget_is_one_line(text: str) -> None:
    with pytest.raises(SpecError, match="budget") as e:
        build_spec({"budget": text})
    assert "\n" not in str(e.value)


def test_coarse_design_spreads_four_lengths_over_the_axis() -> None:
    assert coarse_lengths([16, 64, 128, 256, 512, 1024]) == [16, 128, 256, 1024]
    assert coarse_lengths([512, 16, 64]) == [16, 64, 512]


def test_configs_are_taken_coverage_first(tmp_path: Path) -> None:
    """With 10 s starts and 10 ms requests, 3 minutes hold every tier at the first block size before any second
    block size, and the plan's points are the chosen configs' coarse design (4 lengths x 2 top_k each)."""
    budget = plan_budget(_plan(), 3 * 60, _cache(tmp_path, start_s=50, request_s=0.01))
    assert [(g.engine_values["tier"], g.engine_values["blocks"]) for g in budget.chosen] == [(0, 32), (1, 32), (2, 32)]
    assert all(g.start_source.startswith("measured") for g in budget.chosen)
    assert len(budget.plan.points) == 3 * 8 and len(budget.plan.groups) == 3
    assert {p.text_tokens for p in budget.plan.points} == {16, 128, 256, 1024}
    assert budget.planned_s <= 180


def test_a_budget_holding_no_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="holds no engine config: the first needs 80 s to start \\(default\\)"):
        plan_budget(_plan(), 60, CostCache(tmp_path / "none.json"))


def test_replan_learns_the_machine_after_the_first_start(tmp_path: Path) -> None:
    """Planned with the default 80 s start, 3 minutes hold one config; once a start measured 20 s, the configs
    not yet started are chosen again with it (a first run learns this machine)."""
    cache = CostCache(tmp_path / "costs.json")
    budget = plan_budget(_plan(), 180, cache)
    assert len(budget.chosen) == 1
    first = budget.chosen[0].engine_config_id
    cache.record(cost_key(budget.grid, 0), start_s=20, request_s=0.01, request_text_tokens=356)
    budget.replan({first}, 150, CostCache.load(cache.path))
    assert budget.chosen[0].engine_config_id == first
    assert len(budget.chosen) > 2
    assert budget.chosen[1].start_source == "another model's first start"
    assert len(budget.plan.points) == 8 * len(budget.chosen)


def test_an_unmeasured_model_costs_a_measured_one_scaled_by_size(tmp_path: Path) -> None:
    """Tier 2 never ran here: its requests cost tier 1's measured seconds times the FLOPs estimates' ratio (this
    machine's speed), not the dry run's slow-CPU estimate; with nothing measured, that estimate."""
    plan, cache = _plan(), CostCache(tmp_path / "costs.json")
    alone = request_cost(plan, cache, 2, 256)
    cache.record(cost_key(plan, 1), request_s=0.05, request_text_tokens=256)
    scaled = request_cost(plan, cache, 2, 256)
    ratio = plan.models[2].params / plan.models[1].params
    assert 1 < scaled / 0.05 < ratio  # bigger model, and the per-step overhead is not scaled by size
    assert scaled < alone  # a fast machine's measurement wins over the slow-CPU estimate
    cache.record(cost_key(plan, 0), request_s=0.01, request_text_tokens=256)
    assert request_cost(plan, cache, 2, 256) == pytest.approx(scaled)  # the nearest measured size: tier 1


def test_a_start_is_priced_by_first_and_later_starts(tmp_path: Path) -> None:
    """A first run from nothing on a 2-core Xeon: cpu-tiny's first start 55.9 s (cold imports and compile), then
    cpu-small's first 34.2 s. Tier 2, never started, costs the latest first start (34.2), not the machine's very
    first; tier 0 again costs its own first start until some model has started twice, then the later starts."""
    plan, cache = _plan(), CostCache(tmp_path / "costs.json")
    cache.record(cost_key(plan, 0), start_s=55.9)
    cache.record(cost_key(plan, 1), start_s=34.2)
    assert start_cost(plan, cache, 2) == (34.2, "another model's first start")
    assert start_cost(plan, cache, 0) == (55.9, "measured (its first start)")
    cache.record(cost_key(plan, 0), start_s=18.5)
    assert start_cost(plan, cache, 0) == (18.5, "measured")
    assert start_cost(plan, cache, 1) == (18.5, "another model's later starts")
    for s in (20.0, 22.0):
        cache.record(cost_key(plan, 0), start_s=s)
    assert CostCache.load(cache.path).later_start_s(cost_key(plan, 0)) == 20.0  # the median, first start left out


def test_cost_cache_merges_what_another_process_wrote(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    a, b = CostCache.load(path), CostCache.load(path)
    a.record("cpu|m", start_s=30)
    b.record("cpu|m", request_s=0.1, request_text_tokens=100)  # b was loaded before a wrote
    data = json.loads(path.read_text())
    assert data["cpu|m"]["start_s"] == [30] and data["cpu|m"]["request_s"] == 0.1
    assert CostCache.load(path).request_s("cpu|m", 200) == pytest.approx(0.2)


def _requests(noise_same: float, seed: int = 0) -> pd.DataFrame:
    """Per-request rows of one config: prefill = 2 + 60·(n/1000)², distinct prompts noisy by 5%, same-prompt
    repeats by `noise_same` (relative)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (16, 128, 256, 1024):
        true = 2 + 60 * (n / 1000) ** 2
        for rep in range(4):
            rows.append(
                {
                    "top_k": 0,
                    "point_id": f"p{n}",
                    "rep": rep,
                    "prompt_kind": "distinct",
                    "text_tokens": n,
                    "prefill": true * (1 + 0.05 * rng.standard_normal()),
                    "decode": 2.0,
                }
            )
        for rep in range(4, 7):
            rows.append(
                {
                    "top_k": 0,
                    "point_id": f"p{n}",
                    "rep": rep,
                    "prompt_kind": "same",
                    "text_tokens": n,
                    "prefill": true * (1 + noise_same * rng.standard_normal()),
                    "decode": 2.0,
                }
            )
    return pd.DataFrame(rows)


def test_refinement_picks_the_widest_interval_over_the_floor() -> None:
    axis = [16, 64, 128, 256, 512, 1024]
    assert candidates([16, 128, 256, 1024], axis, 16, 1024) == [48, 64, 184, 512]
    ranked = rank(_requests(noise_same=0.001), ["top_k"], axis)
    assert ranked and ranked == sorted(ranked, key=lambda c: -c.ratio)
    assert ranked[0].ratio > 1 and ranked[0].target == "prefill"
    picked = choose(ranked, lambda c: True)
    assert [c.length for c in picked] == [ranked[0].length]  # one per sampling config
    assert choose(ranked, lambda c: False) == []  # nothing fits the time left
    tried = {(ranked[0].config, ranked[0].length)}
    assert all(c.length != ranked[0].length for c in rank(_requests(0.001), ["top_k"], axis, 0, tried))


def test_refinement_stops_when_every_interval_is_within_the_floor() -> None:
    ranked = rank(_requests(noise_same=0.5), ["top_k"], [16, 64, 128, 256, 512, 1024])
    assert ranked and all(c.ratio <= 1 for c in ranked)
    assert choose(ranked, lambda c: True) == []


def _cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"HARNESS_CACHE_DIR": str(tmp_path)}
    result = runner.invoke(app, ["sweep", "--out", str(tmp_path / "r"), *args], env=env)
    return result.exit_code, result.stdout + result.stderr


def test_the_embedded_default_is_budgeted_and_off_gives_the_full_grid(tmp_path: Path) -> None:
    code, output = _cli(tmp_path, "--dry-run")
    assert code == 0, output
    assert "budget 3m (180 s)" in output and "estimated duration 3.0 min" in output
    code, output = _cli(tmp_path, "--dry-run", "--budget", "off")
    assert code == 0 and "budget" not in output.split("axes")[-1].split("engine-restart")[0]
    assert "72 points x 7 requests" in output
    code, output = _cli(tmp_path, "--dry-run", "--study", "full-grid")
    assert code == 0 and "72 points x 7 requests" in output
    code, output = _cli(tmp_path, "--dry-run", "--tier", "0")  # axes asked for: no budget unless asked
    assert code == 0 and "budget" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "soon"], "budget 'soon' is not a duration"),
        (["--budget", "20s"], "holds no engine config"),
        (["--study", "nope"], "no study 'nope'"),
        (["--budget", "4m", "--ray", "auto"], "--budget plans one machine's time"),
    ],
)
def test_bad_budget_flags(tmp_path: Path, args: list[str], message: str) -> None:
    code, output = _cli(tmp_path, *args)
    assert code == 2, output
    assert message in output
    assert not (tmp_path / "r").exists()
