"""The nightly's detection study (estimator/study/nightly_detection.py): Clopper–Pearson intervals, which size runs
next, and whole nights through a stand-in `profile` that honours the injected slowdown the study sets (the real
engine's nights run only as `estimate experiment nightly-detection`, never in CI)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from estimator.nightly.interleave import SLOWDOWN_ENV
from estimator.study.nightly_detection import (
    NIGHTS_FILE,
    DetectionSpec,
    by_machine,
    clopper_pearson,
    next_size,
    read_nights,
    rounds_needed,
    run_study,
)

ROOT = Path(__file__).resolve().parents[3]


def test_clopper_pearson_matches_the_published_values() -> None:
    assert clopper_pearson(0, 20) == {"rate": 0.0, "lo": 0.0, "hi": 0.1684, "k": 0, "n": 20}
    assert clopper_pearson(10, 10) == {"rate": 1.0, "lo": 0.6915, "hi": 1.0, "k": 10, "n": 10}
    five = clopper_pearson(5, 10)
    assert (five["lo"], five["hi"]) == (0.1871, 0.8129)
    assert clopper_pearson(0, 0)["rate"] is None


def test_the_next_size_is_the_one_furthest_below_its_target() -> None:
    targets = {0: 4, 5: 2, 10: 2}
    rng = np.random.default_rng(0)
    nights = [{"size_pct": 0}, {"size_pct": 0}, {"size_pct": 5}, {"size_pct": 10, "failed": "exit 1"}]
    assert next_size(nights, targets, rng) == 10  # 0/2 done: a failed night does not count
    nights.append({"size_pct": 10})
    assert {next_size(nights, targets, np.random.default_rng(s)) for s in range(20)} == {0, 5, 10}  # all at 1/2
    done = [{"size_pct": s} for s, t in targets.items() for _ in range(t)]
    assert next_size(done, targets, rng) is None


FAKE_PROFILE = """
import json, os, shutil, sys
import pandas as pd
args = sys.argv[1:]
out, name = args[args.index("--out") + 1], args[args.index("--name") + 1]
assert "--canary" in args
slowdown = float(os.environ.get("{env}", "") or 0)
dest = os.path.join(out, name)
shutil.copytree("{src}", dest)
manifest = json.load(open(os.path.join(dest, "manifest.json")))
manifest["run_id"] = name
manifest["canary"] = {{"before": {{"prefill": {{"median_ms": 5.0}}, "decode": {{"median_ms": 1.6}}}}}}
if slowdown:
    manifest.setdefault("environment", {{}})["injected_slowdown"] = slowdown
json.dump(manifest, open(os.path.join(dest, "manifest.json"), "w"))
for f in os.listdir(os.path.join(dest, "samples")):
    if f.endswith(".parquet"):
        path = os.path.join(dest, "samples", f)
        frame = pd.read_parquet(path)
        frame["latency_ms"] *= 1 + slowdown
        frame["run_id"] = name
        frame.to_parquet(path, index=False)
"""


def test_nights_are_interleaved_slowed_on_one_side_and_resumable(
    tmp_path: Path, run_writer: Callable[..., Path]
) -> None:
    src = run_writer(tmp_path / "src", tiers=(1,), top_ks=(0,), lengths=(32, 128), noise=0.01)
    fake = tmp_path / "fake_profile.py"
    fake.write_text(FAKE_PROFILE.format(env=SLOWDOWN_ENV, src=src))
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text("reps = 4\n")
    spec = DetectionSpec(
        out=tmp_path / "study",
        runs_dir=tmp_path / "runs",
        spec=spec_file,
        nights=1,
        targets={0: 1, 20: 1},
        profile=f"{sys.executable} {fake}",
    )
    said: list[str] = []
    run_study(spec, said.append)
    result = run_study(spec, said.append)  # resumes: the second size, then every target is met
    assert run_study(spec, said.append)["pairs"] == {"0": 1, "20": 1}
    assert "every size has its target count of nights" in said

    nights = read_nights(spec.out)
    assert sorted(n["size_pct"] for n in nights) == [0, 20]
    for night in nights:
        sides = [s["side"] for s in night["sweeps"]]
        assert sorted(sides) == ["baseline", "baseline", "tonight", "tonight"]
        slowed = {s["side"]: s["injected_slowdown"] for s in night["sweeps"]}
        assert slowed == {"baseline": 0.0, "tonight": night["size_pct"] / 100}
        ratios = {v["phase"]: v["ratio"] for v in night["verdicts"]}
        assert ratios == {
            "prefill": pytest.approx(1 + night["size_pct"] / 100),
            "decode": pytest.approx(1 + night["size_pct"] / 100),
        }
        assert night["flagged"] == (night["size_pct"] == 20)
    assert result["detection_rate"]["20"]["k"] == 1 and result["false_alarm_rate"]["k"] == 0
    assert set(result) >= {"detection_rate", "false_alarm_rate", "pairs", "normalized", "canary"}
    assert json.loads((spec.out / "detection.json").read_text())["pairs"] == {"0": 1, "20": 1}

    # a line cut short by a kill is skipped, and the study goes on from the whole lines
    with (spec.out / NIGHTS_FILE).open("a") as f:
        f.write('{"night": 2, "size_')
    assert len(read_nights(spec.out)) == 2


def test_the_committed_study_spec_is_a_valid_sweep_spec() -> None:
    from harness.rundata.spec import build_spec, load_spec_file  # the study spec is the harness's input

    spec = build_spec(load_spec_file(ROOT / "scripts" / "nightly_study_spec.toml"))
    assert spec.axes["text_tokens"] == [64, 256] and spec.axes["tier"] == [0]


def test_rounds_needed_follows_from_the_unchanged_nights_spread() -> None:
    """Round log ratios with sd 0.1 and two tests a night: z(1 - 0.025) + z(0.9) = 3.24, so a 10% slowdown needs
    (3.24 * 0.1 / ln 1.1)^2 = 11.6 rounds; injected nights do not enter the spread."""
    rng = np.random.default_rng(0)
    logs = rng.normal(0, 0.1, (400, 2, 2))
    nights = [
        {"size_pct": 0, "verdicts": [{"label": "tier=0", "phase": ph, "round_ratios": list(np.exp(logs[i, j]))}
                                     for j, ph in enumerate(("prefill", "decode"))]}
        for i in range(400)
    ]
    nights.append({"size_pct": 20, "verdicts": [{"label": "tier=0", "phase": "decode", "round_ratios": [9.0, 0.1]}]})
    out = rounds_needed(nights, n_boot=50)
    assert out["tests_per_night"] == 2
    decode = out["per_config"]["tier=0 decode"]
    assert decode["round_log_sd"] == pytest.approx(0.1, rel=0.06)
    assert 10 <= decode["rounds"] <= 14 and decode["rounds_ci"][0] <= decode["rounds"] <= decode["rounds_ci"][1]
    assert rounds_needed([n for n in nights if n["size_pct"]]) == {}


def test_each_machine_gets_its_own_rates_and_rounds() -> None:
    """Nights from two CPUs: each machine's false alarms, detections and pair counts are its own; a night without a
    recorded machine is counted as unrecorded, not dropped."""
    xeon = {"cpu_model": "Xeon", "dtype": "float32"}
    epyc = {"cpu_model": "EPYC", "dtype": "bfloat16"}

    def night(size: int, flagged: bool, machine: dict[str, str] | None) -> dict[str, object]:
        line: dict[str, object] = {"size_pct": size, "flagged": flagged, "normalized_flagged": False, "verdicts": []}
        if machine:
            line["machine"] = machine
        return line

    nights = [night(0, True, xeon), night(0, False, xeon), night(10, True, xeon),
              night(0, False, epyc), night(10, False, epyc), night(10, True, epyc), night(0, False, None)]
    out = by_machine(nights, [0, 10])
    assert set(out) == {"Xeon, float32", "EPYC, bfloat16", "unrecorded"}
    assert out["Xeon, float32"]["false_alarm_rate"]["k"] == 1 and out["Xeon, float32"]["pairs"] == {"0": 2, "10": 1}
    assert out["EPYC, bfloat16"]["detection_rate"]["10"] == clopper_pearson(1, 2)
    assert out["EPYC, bfloat16"]["false_alarm_rate"]["n"] == 1 and out["unrecorded"]["pairs"] == {"0": 1, "10": 0}
