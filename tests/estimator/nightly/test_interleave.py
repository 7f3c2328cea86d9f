"""Interleaved nights (estimator/nightly/interleave.py): the paired ratio and its flag on synthetic sweeps, the
canary's normalization, reading a run folder's figures, and the nightly's refusal of the injected slowdown."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from estimator.cli.extra import nightly
from estimator.errors import EstimatorError
from estimator.nightly.interleave import (
    SIDES,
    SLOWDOWN_ENV,
    SweepFigures,
    canary_ms,
    night_order,
    paired_verdicts,
    refuse_injected,
    sweep_figures,
)
from estimator.nightly.job import run_nightly
from estimator.nightly.spec import NightlySpec


def _sweep(
    rng: np.random.Generator, side: str, round_: int, factor: float = 1.0, canary: float = 1.0, cv: float = 0.03
) -> SweepFigures:
    """One sweep of two text_tokens values, 8 requests each, every latency × `factor`; canary ms × `canary`."""
    requests = {
        "tier=0": {
            "prefill": {
                n: list(factor * base * np.exp(cv * rng.standard_normal(8))) for n, base in ((64, 4.0), (256, 7.0))
            },
            "decode": {
                n: list(factor * base * np.exp(cv * rng.standard_normal(8))) for n, base in ((64, 2.0), (256, 2.2))
            },
        }
    }
    return SweepFigures(side, round_, f"{side}-{round_}", requests, {"prefill": 5.0 * canary, "decode": 1.6 * canary})


def _night(seed: int, factor: float, canary: float = 1.0, rounds: int = 2) -> list[SweepFigures]:
    rng = np.random.default_rng(seed)
    out = []
    for r in range(rounds):
        out += [_sweep(rng, "baseline", r), _sweep(rng, "tonight", r, factor, canary)]
    return out


def test_an_unchanged_night_is_not_flagged_and_a_slower_one_is() -> None:
    same = paired_verdicts(_night(1, 1.0), n_boot=300)
    assert [(v.label, v.phase) for v in same] == [("tier=0", "prefill"), ("tier=0", "decode")]
    assert not any(v.flagged for v in same)
    for v in same:
        assert v.ci[0] < 1 < v.ci[1] and v.ratio == pytest.approx(1.0, abs=0.05)
    slow = paired_verdicts(_night(1, 1.3), n_boot=300)
    assert all(v.flagged for v in slow)
    for v in slow:
        assert v.ratio == pytest.approx(1.3, rel=0.05) and v.ci[0] > 1.05
        assert v.ratio == pytest.approx(float(np.exp(np.mean(np.log(v.round_ratios)))), rel=1e-9)


def test_a_slowdown_within_the_tolerance_is_not_flagged() -> None:
    verdicts = paired_verdicts(_night(2, 1.03), tolerance=0.05, n_boot=300)
    assert not any(v.flagged for v in verdicts)


def test_the_canary_divides_out_a_slower_machine() -> None:
    """Engine and canary both ×1.3 tonight (the machine, not the engine): raw flagged, normalized not."""
    (prefill, decode) = paired_verdicts(_night(3, 1.3, canary=1.3), n_boot=300)
    for v in (prefill, decode):
        assert v.flagged
        assert v.normalized_ratio == pytest.approx(v.ratio / 1.3, rel=1e-9)
        assert v.normalized_ci is not None and v.normalized_ci[0] == pytest.approx(v.ci[0] / 1.3, rel=1e-9)
        assert v.normalized_flagged is False
    engine = paired_verdicts(_night(3, 1.3, canary=1.0), n_boot=300)
    assert all(v.normalized_flagged for v in engine)


def test_without_a_canary_there_is_no_normalized_figure() -> None:
    night = _night(4, 1.0)
    night[0].canary_ms = {"prefill": None, "decode": None}
    assert all(v.normalized_ratio is None and v.normalized_flagged is None for v in paired_verdicts(night, n_boot=50))


def test_rounds_must_pair_up() -> None:
    night = _night(5, 1.0)
    with pytest.raises(EstimatorError, match="two baseline"):
        paired_verdicts([*night, night[0]], n_boot=10)
    with pytest.raises(EstimatorError, match="no round has both"):
        paired_verdicts([s for s in night if s.side == "baseline"], n_boot=10)
    night[1].side = "candidate"
    with pytest.raises(EstimatorError, match="not one of"):
        paired_verdicts(night, n_boot=10)


def test_night_order_measures_both_sides_once_per_round_in_both_orders() -> None:
    order = night_order(30, np.random.default_rng(0))
    assert len(order) == 60
    firsts = set()
    for r in range(30):
        pair = [s for rr, s in order if rr == r]
        assert sorted(pair) == sorted(SIDES)
        firsts.add(pair[0])
    assert firsts == set(SIDES)  # randomized, not always the baseline first


def test_sweep_figures_round_trip_through_json() -> None:
    s = _night(6, 1.1)[1]
    back = SweepFigures.from_json(json.loads(json.dumps(s.as_json())))
    assert back == s


def _with_manifest(run: Path, **fields: object) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    for key, value in fields.items():
        if key == "injected_slowdown":
            manifest.setdefault("environment", {})[key] = value
        else:
            manifest[key] = value
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_a_run_folder_gives_its_requests_canary_and_slowdown(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    canary = {
        "before": {"prefill": {"median_ms": 5.0}, "decode": {"median_ms": 1.5}},
        "after": {"error": "the canary failed"},
    }
    run = _with_manifest(
        run_writer(tmp_path, tiers=(1,), top_ks=(0,), lengths=(32, 128)), canary=canary, injected_slowdown=0.1
    )
    fig = sweep_figures(run, "tonight", 0)
    assert fig.canary_ms == {"prefill": 5.0, "decode": 1.5}  # the failed timing is left out
    assert fig.injected_slowdown == pytest.approx(0.1)
    assert list(fig.requests) == ["tier=1 top_k=0 blocks=32"]
    prefill = fig.requests["tier=1 top_k=0 blocks=32"]["prefill"]
    assert sorted(prefill) == [32, 128] and all(len(v) == 4 + 3 for v in prefill.values())
    assert canary_ms({}) == {"prefill": None, "decode": None}


def test_the_nightly_refuses_the_injected_slowdown(
    tmp_path: Path, run_writer: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EstimatorError, match=SLOWDOWN_ENV):
        refuse_injected(environ={SLOWDOWN_ENV: "0.1"})
    refuse_injected(environ={SLOWDOWN_ENV: ""})
    refuse_injected({"environment": {"cpu_model": "x"}})
    run = _with_manifest(run_writer(tmp_path, tiers=(1,), top_ks=(0,), lengths=(32,)), injected_slowdown=0.2)
    with pytest.raises(EstimatorError, match="injected slowdown of 20%"):
        run_nightly(NightlySpec(state_dir=tmp_path / "state", run=run, report=False))
    assert not (tmp_path / "state" / "baseline.json").exists()

    app = typer.Typer()
    app.command()(nightly)
    monkeypatch.setenv(SLOWDOWN_ENV, "0.05")
    clean = run_writer(tmp_path / "clean", tiers=(1,), top_ks=(0,), lengths=(32,))
    result = CliRunner().invoke(app, ["--run", str(clean), "--state-dir", str(tmp_path / "s2"), "--no-report"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and SLOWDOWN_ENV in result.stderr


FAKE_PROFILE = """
import json, os, re, shutil, sys
import pandas as pd
args = sys.argv[1:]
out, name, spec = (args[args.index(flag) + 1] for flag in ("--out", "--name", "--spec"))
assert "--canary" in args, args
factor = float(re.search(r"# factor ([0-9.]+)", open(spec).read()).group(1))
if "--slower" in args:
    factor *= 1.5
dest = os.path.join(out, name)
shutil.copytree("{src}", dest)
manifest = json.load(open(os.path.join(dest, "manifest.json")))
manifest["run_id"] = name
manifest["canary"] = {{"before": {{"prefill": {{"median_ms": 5.0}}, "decode": {{"median_ms": 1.6}}}}}}
json.dump(manifest, open(os.path.join(dest, "manifest.json"), "w"))
for f in os.listdir(os.path.join(dest, "samples")):
    if f.endswith(".parquet"):
        path = os.path.join(dest, "samples", f)
        frame = pd.read_parquet(path)
        frame["latency_ms"] *= factor
        frame["run_id"] = name
        frame.to_parquet(path, index=False)
"""


def test_an_interleaved_night_measures_the_accepted_settings_again(
    tmp_path: Path, run_writer: Callable[..., Path]
) -> None:
    """The first night records its settings; a night with --interleave 2 sweeps those settings (spec text and
    profile arguments) and tonight's alternately, and the paired rounds decide."""
    src = run_writer(tmp_path / "src", tiers=(1,), top_ks=(0,), lengths=(32, 128), noise=0.01)
    fake = tmp_path / "fake_profile.py"
    fake.write_text(FAKE_PROFILE.format(src=src))
    spec_file = tmp_path / "nightly.toml"
    spec_file.write_text("reps = 4\n# factor 1.0\n")
    state = tmp_path / "state"

    def night(report: bool = False, **kw: Any) -> tuple[int, dict[str, Any]]:
        spec = NightlySpec(
            spec=spec_file, state_dir=state, profile=f"{sys.executable} {fake}", report=report, bootstrap=200, **kw
        )
        result = run_nightly(spec)
        return result.exit_code, result.summary

    code, first = night(interleave=2, profile_args=["--canary"])
    assert code == 0 and first["first_night"] and first["interleaved"] is None  # nothing to interleave with yet
    assert any("no accepted baseline yet" in w for w in first["warnings"])
    recorded = json.loads((state / "baseline.json").read_text())["settings"]
    assert recorded == {
        "spec_name": "nightly.toml",
        "spec_text": "reps = 4\n# factor 1.0\n",
        "profile_args": ["--canary"],
    }

    code, same = night(interleave=2, profile_args=["--canary"])
    assert code == 0 and not same["regression"]
    inter = same["interleaved"]
    assert sorted(inter["order"]) == ["0:baseline", "0:tonight", "1:baseline", "1:tonight"]
    assert inter["runs"][inter["order"].index("0:tonight")] == same["run_id"]  # the night's own run
    assert {v["phase"]: v["ratio"] for v in inter["verdicts"]} == {"prefill": 1.0, "decode": 1.0}

    spec_file.write_text("reps = 4\n# factor 1.3\n")  # tonight's settings are 30% slower; the accepted ones not
    code, slow = night(report=True, interleave=2, profile_args=["--canary", "--slower"])  # and 1.5x from --slower
    assert code == 1 and slow["regression"]
    ratios = {v["phase"]: v["ratio"] for v in slow["interleaved"]["verdicts"]}
    assert ratios == {"prefill": pytest.approx(1.95), "decode": pytest.approx(1.95)}
    assert all(c["flagged"] for c in slow["comparisons"]) and slow["confirm_run_id"] is None
    assert "interleaved night (2 rounds" in slow["rule"]
    # the baseline side ran the accepted spec text, not tonight's file
    (base_spec,) = (state / "interleave").glob(f"{slow['run_id']}-baseline.toml")
    assert "# factor 1.0" in base_spec.read_text()
    report = (state / "reports" / slow["run_id"] / "report.md").read_text()
    assert "Interleaved night" in report and "canary-normalized" in report
