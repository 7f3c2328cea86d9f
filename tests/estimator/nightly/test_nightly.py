"""The nightly regression check: bootstrap flagging on synthetic arrays, the state flow (baseline, history, exit
codes) on synthetic runs, the sweep subprocess wiring with a stand-in `profile`, and the check on real CPU runs
whose latencies really differ (slow)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from estimator.cli.extra import nightly
from estimator.data.runs import load_runs
from estimator.errors import EstimatorError
from estimator.nightly.control import apply_history, control_limits
from estimator.nightly.job import run_nightly
from estimator.nightly.spec import EXIT_OK, EXIT_REGRESSION, EXIT_SWEEP_FAILED, NightlySpec
from estimator.nightly.stats import (
    RatioCI,
    apply_confirmation,
    bootstrap_ratio,
    compare_latency,
    compare_mape,
    config_medians,
    is_improvement,
    is_regression,
)
from estimator.study.nightly_results import load_history, load_nightly_summary
from tests.conftest import run_profile

# ---------------------------------------------------------------- bootstrap flagging (synthetic arrays)


def _draw(rng: np.random.Generator, median_ms: float, n: int, cv: float = 0.15) -> np.ndarray:
    return median_ms * np.exp(cv * rng.standard_normal(n))


def test_clear_slowdown_is_flagged() -> None:
    rng = np.random.default_rng(1)
    base = [_draw(rng, m, 8) for m in (5.0, 20.0, 80.0)]
    slow = [_draw(rng, m * 1.5, 8) for m in (5.0, 20.0, 80.0)]
    ci = bootstrap_ratio(base, slow, n_boot=1000, seed=0)
    assert ci.low <= ci.ratio <= ci.high
    assert 1.2 < ci.ratio < 1.9
    assert is_regression(ci, 0.05)
    assert not is_improvement(ci, 0.05)


def test_same_distribution_is_rarely_flagged() -> None:
    """Two draws of the same latencies: the 95% CI must almost never lie above 1.05 (false alarms)."""
    flags = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        base = [_draw(rng, m, 8) for m in (5.0, 20.0, 80.0)]
        same = [_draw(rng, m, 8) for m in (5.0, 20.0, 80.0)]
        ci = bootstrap_ratio(base, same, n_boot=500, seed=seed)
        assert ci.low < ci.ratio < ci.high
        flags += is_regression(ci, 0.05)
    assert flags <= 1


def test_small_shift_within_tolerance_is_not_flagged() -> None:
    """A real but small slowdown (3%) measured very precisely stays under the 5% tolerance."""
    rng = np.random.default_rng(2)
    base = [_draw(rng, 10.0, 400, cv=0.02)]
    slow = [_draw(rng, 10.3, 400, cv=0.02)]
    ci = bootstrap_ratio(base, slow, n_boot=500)
    assert 1.0 < ci.low < ci.high < 1.05
    assert not is_regression(ci, 0.05)
    assert is_regression(ci, 0.0)


def test_speedup_is_an_improvement_not_a_regression() -> None:
    rng = np.random.default_rng(3)
    ci = bootstrap_ratio([_draw(rng, 10.0, 10)], [_draw(rng, 6.0, 10)], n_boot=500)
    assert is_improvement(ci, 0.05) and not is_regression(ci, 0.05)


def test_ratio_is_the_geometric_mean_over_strata() -> None:
    """Noise-free strata: ratio 2 in one, 1 in the other → sqrt(2), with a degenerate CI."""
    base = [np.full(5, 10.0), np.full(5, 40.0)]
    tonight = [np.full(5, 20.0), np.full(5, 40.0)]
    ci = bootstrap_ratio(base, tonight, n_boot=200)
    assert ci == RatioCI(pytest.approx(np.sqrt(2)), pytest.approx(np.sqrt(2)), pytest.approx(np.sqrt(2)), 2)


def test_bootstrap_needs_overlap_and_positive_latencies() -> None:
    with pytest.raises(EstimatorError, match="no stratum"):
        bootstrap_ratio([np.zeros(0)], [np.ones(3)])
    with pytest.raises(EstimatorError, match="positive"):
        bootstrap_ratio([np.array([1.0, -1.0])], [np.ones(3)])


def test_mape_growth_rule() -> None:
    checks = {
        c.phase: c for c in compare_mape({"prefill": 4.0, "decode": 10.0}, {"prefill": 4.8, "decode": 13.0}, 0.25, 1.0)
    }
    assert not checks["prefill"].flagged  # +20%: under 25%
    assert checks["decode"].flagged and checks["decode"].growth_pct == pytest.approx(30.0)
    tiny = compare_mape({"prefill": 1.0, "decode": None}, {"prefill": 1.5, "decode": 5.0}, 0.25, 1.0)
    assert not tiny[0].flagged  # +50% but only half a point
    assert not tiny[1].flagged and tiny[1].growth_pct is None


# ---------------------------------------------------------------- synthetic runs: the state flow


def _scaled_copy(run: Path, dest_root: Path, run_id: str, factor: float) -> Path:
    """A copy of a run folder with every latency multiplied by `factor` (a slower engine, same labels)."""
    dest = dest_root / run_id
    shutil.copytree(run, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["run_id"] = run_id
    (dest / "manifest.json").write_text(json.dumps(manifest))
    for f in (dest / "samples").glob("*.parquet"):
        frame = pd.read_parquet(f)
        frame["latency_ms"] *= factor
        frame["run_id"] = run_id
        frame.to_parquet(f, index=False)
    return dest


@pytest.fixture(scope="module")
def synthetic_nights(tmp_path_factory: pytest.TempPathFactory, run_writer: Callable[..., Path]) -> dict[str, Path]:
    """Three nights of the same config labels: a baseline, a re-run (other noise), and a 40% slower engine."""
    root = tmp_path_factory.mktemp("nights")
    base = run_writer(root, run_id="night-1", tiers=(1, 2), top_ks=(0,), lengths=(32, 128, 512), seed=0)
    again = run_writer(root, run_id="night-2", tiers=(1, 2), top_ks=(0,), lengths=(32, 128, 512), seed=1)
    slow = _scaled_copy(base, root, "night-3", 1.4)
    return {"base": base, "again": again, "slow": slow}


def test_compare_latency_on_synthetic_runs(synthetic_nights: dict[str, Path]) -> None:
    base = load_runs([synthetic_nights["base"]])
    same, _ = compare_latency(base, load_runs([synthetic_nights["again"]]), ["tier", "top_k", "blocks"], n_boot=300)
    assert len(same) == 4  # 2 tiers × 2 phases
    assert not any(c.flagged for c in same)
    slow, warnings = compare_latency(base, load_runs([synthetic_nights["slow"]]), ["tier", "top_k", "blocks"])
    assert all(c.flagged for c in slow) and not warnings
    for c in slow:
        assert c.ratio == pytest.approx(1.4, rel=1e-6)
        assert c.text_tokens == [32, 128, 512]
        assert c.label.startswith("tier=")


def test_nightly_flow_on_existing_runs(synthetic_nights: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"

    def night(run: Path, **kw: object) -> tuple[int, dict]:
        result = run_nightly(NightlySpec(state_dir=state, run=run, bootstrap=300, **kw))  # type: ignore[arg-type]
        return result.exit_code, json.loads(result.summary_path.read_text())

    code, first = night(synthetic_nights["base"], report=False)
    assert code == EXIT_OK and first["first_night"] and first["accepted"]
    assert json.loads((state / "baseline.json").read_text())["run_id"] == "night-1"
    assert "accepted as the baseline" in first["messages"][0]

    code, second = night(synthetic_nights["again"], report=False)
    assert code == EXIT_OK and not second["regression"] and not second["accepted"]
    assert second["baseline_run_id"] == "night-1"
    assert {c["phase"] for c in second["comparisons"]} == {"prefill", "decode"}
    assert all(not c["flagged"] for c in second["comparisons"])
    assert [m["phase"] for m in second["estimator_checks"]] == ["prefill", "decode"]

    code, third = night(synthetic_nights["slow"])
    assert code == EXIT_REGRESSION and third["regression"]
    assert {c["label"] for c in third["comparisons"] if c["flagged"]} == {
        "tier=1 top_k=0 blocks=32",
        "tier=2 top_k=0 blocks=32",
    }
    assert json.loads((state / "baseline.json").read_text())["run_id"] == "night-1"  # not accepted
    assert json.loads((state / "latest.json").read_text())["run_id"] == "night-3"
    history = [json.loads(line) for line in (state / "history.jsonl").read_text().splitlines()]
    assert [h["run_id"] for h in history] == ["night-1", "night-2", "night-3"]
    assert [h["regression"] for h in history] == [False, False, True]
    page = (state / "reports" / "night-3" / "report.html").read_text()
    assert "Nightly trend" in page and "REGRESSION FLAGGED" in page
    # what the report reads: the same nights, typed (estimator/study/nightly_results.py)
    typed = load_nightly_summary(state / "latest.json")
    assert typed.run_id == "night-3" and typed.regression and typed.schema_id == third["schema"]
    assert {c.label for c in typed.comparisons if c.flagged} == {"tier=1 top_k=0 blocks=32", "tier=2 top_k=0 blocks=32"}
    lines = load_history(state / "history.jsonl")
    assert [(h.run_id, h.regression, h.accepted) for h in lines] == [
        ("night-1", False, True), ("night-2", False, False), ("night-3", True, False)]
    assert {m.flagged for m in lines[2].medians if m.label == "tier=1 top_k=0 blocks=32"} == {True}
    assert (state / "reports" / "night-3" / "summary.json").is_file()

    # --accept promotes even a flagged night; the exit code still reports the regression.
    code, accepted = night(synthetic_nights["slow"], accept=True, report=False)
    assert code == EXIT_REGRESSION and accepted["accepted"]
    assert json.loads((state / "baseline.json").read_text())["run_id"] == "night-3"

    # --baseline RUN overrides the accepted one (its model is trained on the fly).
    code, named = night(synthetic_nights["again"], baseline=synthetic_nights["base"], report=False)
    assert code == EXIT_OK and named["baseline_run_id"] == "night-1" and named["baseline_source"] == "--baseline"


FAKE_PROFILE = """
import json, shutil, sys
from pathlib import Path
args = sys.argv[1:]
Path(sys.argv[0]).with_suffix(".args").write_text(json.dumps(args))
out, name = Path(args[args.index("--out") + 1]), args[args.index("--name") + 1]
src = Path({confirm_src!r} if name.endswith("-confirm") else {src!r})
shutil.copytree(src, out / name)
m = json.loads((out / name / "manifest.json").read_text())
m["run_id"] = name
(out / name / "manifest.json").write_text(json.dumps(m))
sys.exit({code})
"""


def _fake_profile(tmp_path: Path, src: Path, code: int, confirm_src: Path | None = None, tag: str = "") -> Path:
    """A stand-in `profile` that copies `src` (or `confirm_src` for a `*-confirm` run) to --out/--name."""
    script = tmp_path / f"fake_profile_{code}{tag}.py"
    script.write_text(FAKE_PROFILE.format(src=str(src), confirm_src=str(confirm_src or src), code=code))
    return script


def test_nightly_runs_the_profile_cli(synthetic_nights: dict[str, Path], tmp_path: Path) -> None:
    """The sweep runs as `profile sweep --spec S --out STATE/runs --name nightly-... --quiet EXTRA...`."""
    spec = tmp_path / "nightly.toml"
    spec.write_text("reps = 4\n")
    script = _fake_profile(tmp_path, synthetic_nights["base"], 0)
    app = typer.Typer()
    app.command()(nightly)
    result = CliRunner().invoke(
        app,
        [
            "--spec",
            str(spec),
            "--state-dir",
            str(tmp_path / "state"),
            "--profile",
            f"{sys.executable} {script}",
            "--profile-arg=--model",
            "--profile-arg=cpu-base",
            "--no-report",
            "--bootstrap",
            "200",
        ],
    )
    assert result.exit_code == 0, result.output
    args = json.loads(script.with_suffix(".args").read_text())
    assert args[:3] == ["sweep", "--spec", str(spec)]
    assert args[args.index("--out") + 1] == str(tmp_path / "state" / "runs")
    assert args[args.index("--name") + 1].startswith("nightly-")
    assert args[-4:] == ["--quiet", "--model", "cpu-base", "--canary"]  # every nightly sweep times the canary
    assert "accepted as the baseline" in result.stdout

    # A sweep with failed points: exit 3, and a first night is not accepted.
    failing = _fake_profile(tmp_path, synthetic_nights["again"], 1)
    state = tmp_path / "state-failing"
    out = run_nightly(NightlySpec(spec=spec, state_dir=state, profile=f"{sys.executable} {failing}", report=False))
    assert out.exit_code == EXIT_SWEEP_FAILED
    assert not (state / "baseline.json").exists()
    assert any("exited with code 1" in w for w in out.summary["warnings"])


def test_nightly_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(nightly)
    result = CliRunner().invoke(app, ["--spec", str(tmp_path / "missing.toml"), "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: nightly sweep spec {tmp_path / 'missing.toml'} not found"]
    result = CliRunner().invoke(app, ["--run", str(tmp_path), "--state-dir", str(tmp_path), "--tolerance", "2"])
    assert result.exit_code == 2 and result.stderr.startswith("error: tolerance")


# ---------------------------------------------------------------- real runs whose latencies really differ

# Matches the session's `small_run` sweep (tier 0 = cpu-tiny, top_k 0, max_new_tokens 9, warm-up 2) on the
# config they share (blocks 32) and two of its three lengths, so small_run is a "same config" run.
TINY = [
    "--tier",
    "0",
    "--blocks",
    "32",
    "--top-k",
    "0",
    "--text-tokens",
    "64,256",
    "--reps",
    "3",
    "--same-prompt-repeats",
    "3",
    "--max-new-tokens",
    "9",
    "--warmup",
    "2",
    "--quiet",
]


def _sweep(out: Path, *extra: str) -> Path:
    proc = run_profile("sweep", *TINY, *extra, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    return run


@pytest.mark.slow
def test_real_runs_regression_check(small_run: Path, tmp_path: Path) -> None:
    """cpu-base labelled tier 0 is flagged against cpu-tiny; two runs of the same config are not."""
    tiny = load_runs([_sweep(tmp_path / "tiny")])
    base_model = load_runs([_sweep(tmp_path / "base", "--model", "cpu-base")])
    axes = ["tier", "top_k", "blocks"]
    slow, warnings = compare_latency(tiny, base_model, axes)
    assert {(c.label, c.phase) for c in slow} == {("tier=0 top_k=0 blocks=32", p) for p in ("prefill", "decode")}
    for c in slow:
        assert c.flagged, c
        assert c.ratio > 1.3 and c.models == {"baseline": ["cpu-tiny"], "tonight": ["cpu-base"]}
    base = load_runs([small_run])
    same, warnings = compare_latency(base, tiny, axes)
    assert {c.label for c in same} == {"tier=0 top_k=0 blocks=32"}
    # Two real runs minutes apart on a busy 2-core box drift by more than one run's bootstrap CI: the nightly keeps
    # a flag only beyond the control limit of the accepted nights (here the baseline alone, the fallback spread).
    history = [{"run_id": "baseline", "accepted": True, "medians": config_medians(base, axes)}]
    apply_history(same, config_medians(tiny, axes), control_limits(history))
    # On a CPU the decode step's level moves between engine starts of the same config by more than the one-night
    # fallback limit (x1.16-1.21): the detection study's unchanged rounds have a decode log sd of 0.24-0.27 on both
    # a float32 Xeon and a bfloat16 EPYC (docs/nightly-detection), and one CI run saw x2.1 after the re-run. Where
    # bfloat16 is not native the manifest also records the decode path (per-op dispatch, 4.1-7.2 ms between starts,
    # docs/simulate.md); every CPU run records its cpu_dtype. That spread is issue 35's subject, answered by
    # interleaved nights; this check holds only prefill (round log sd 0.11-0.20) to the single-pair rule on a CPU.
    on_cpu = any("cpu_dtype" in (r.manifest.get("environment") or {}) for r in [*base.runs, *tiny.runs])
    varies = {"decode"} if on_cpu else set()
    if any(c.flagged and c.phase not in varies for c in same):
        # the start-to-start drift went past the one-night limit (it did once in CI: issue 35's subject): the
        # nightly then measures once more and keeps only the flags the re-run repeats, and so does this check
        again, _ = compare_latency(base, load_runs([_sweep(tmp_path / "confirm")]), axes)
        apply_confirmation(same, again)
    assert not [c for c in same if c.flagged and c.phase not in varies], [c.model_dump() for c in same]
    history_slow = [{"run_id": "tiny", "accepted": True, "medians": config_medians(tiny, axes)}]
    apply_history(slow, config_medians(base_model, axes), control_limits(history_slow))
    assert all(c.flagged for c in slow)  # the real slowdown still stands under the full rule
    assert all(c.text_tokens == [64, 256] for c in same)
    assert any("blocks=64" in w for w in warnings)  # small_run's other config has no counterpart


def test_missing_baseline_run(synthetic_nights: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    gone = {
        "run_id": "old",
        "run_path": str(tmp_path / "gone"),
        "model_path": None,
        "held_out_mape_pct": {},
        "accepted_at": "",
        "note": "",
    }
    (state / "baseline.json").write_text(json.dumps(gone))
    with pytest.raises(EstimatorError, match="is gone"):
        run_nightly(NightlySpec(state_dir=state, run=synthetic_nights["again"], report=False))
    out = run_nightly(NightlySpec(state_dir=state, run=synthetic_nights["again"], report=False, accept=True))
    assert out.exit_code == EXIT_OK and out.summary["accepted"]
    assert json.loads((state / "baseline.json").read_text())["run_id"] == "night-2"


def test_a_crash_is_not_a_regression(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An unexpected error exits 4 (with its traceback), never 1, so cron cannot mistake it for a regression."""
    import estimator.nightly.job

    def boom(*_args: object, **_kw: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(estimator.nightly.job, "run_nightly", boom)
    app = typer.Typer()
    app.command()(nightly)
    result = CliRunner().invoke(app, ["--state-dir", str(tmp_path)])
    assert result.exit_code == 4
    assert "RuntimeError: disk on fire" in result.stderr


def test_a_flag_must_be_confirmed_by_a_rerun(synthetic_nights: dict[str, Path], tmp_path: Path) -> None:
    """A flagged night sweeps once more: a disturbance the re-run does not repeat is not a regression."""
    spec = tmp_path / "nightly.toml"
    spec.write_text("reps = 4\n")
    state = tmp_path / "state"
    run_nightly(NightlySpec(state_dir=state, run=synthetic_nights["base"], report=False))  # the baseline

    def night(first: Path, rerun: Path, tag: str) -> dict:
        script = _fake_profile(tmp_path, first, 0, confirm_src=rerun, tag=tag)
        out = run_nightly(
            NightlySpec(spec=spec, state_dir=state, profile=f"{sys.executable} {script}", report=False, bootstrap=300)
        )
        return {"exit": out.exit_code, **out.summary}

    transient = night(synthetic_nights["slow"], synthetic_nights["again"], "transient")
    assert transient["exit"] == EXIT_OK and not transient["regression"]
    assert transient["confirm_run_id"].endswith("-confirm")
    assert all(c["confirm"] is not None and not c["flagged"] for c in transient["comparisons"])
    assert any("not on the re-run" in w for w in transient["warnings"])

    real = night(synthetic_nights["slow"], synthetic_nights["slow"], "real")
    assert real["exit"] == EXIT_REGRESSION and real["regression"]
    assert all(c["flagged"] and c["confirm"]["flagged"] for c in real["comparisons"])

    calm = night(synthetic_nights["again"], synthetic_nights["slow"], "calm")
    assert calm["exit"] == EXIT_OK and calm["confirm_run_id"] is None  # nothing flagged: no re-run


def test_nightly_files_of_another_shape_are_one_line_errors(synthetic_nights: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run_nightly(NightlySpec(state_dir=state, run=synthetic_nights["base"], report=False, bootstrap=300))
    raw = json.loads(result.summary_path.read_text())
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**raw, "regresion": True}))
    with pytest.raises(EstimatorError, match=r"not a summary written by `estimate nightly`.*regresion") as err:
        load_nightly_summary(foreign)
    assert "\n" not in str(err.value)
    history = state / "history.jsonl"
    good = history.read_text()
    history.write_text(good + good.strip()[: len(good) // 2])  # a line cut short by a kill: skipped
    assert [h.run_id for h in load_history(history)] == ["night-1"]
    history.write_text(good + json.dumps({"run_id": "night-9", "medians": "none"}) + "\n")
    with pytest.raises(EstimatorError, match=r"history.jsonl:2: not a history line"):
        load_history(history)


def test_report_sections_parse_no_json() -> None:
    """Every section renders typed results; reading files (and their JSON) is build.py's and the loaders' job."""
    import ast

    sections = Path(__file__).resolve().parents[3] / "estimator" / "report" / "sections"
    for path in sorted(sections.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        reads = {c for c in calls if c.endswith(("json.load", "json.loads", "read_text", "read_jsonl_dicts", "open"))}
        assert not reads, f"{path.name} reads a file itself: {sorted(reads)}"
