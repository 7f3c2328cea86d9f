"""Calibration on the running server (estimator/sim/calibrate.py) and the replica's front end: the fit recovers what
made a run, the front end queues, the readers take `--load i`, and bad input is one line with exit 2.

The 'served' runs here are made by the replica itself with known terms (the server is the boundary these tests
cannot have); what is under test is the fit that must find the terms again, and the readers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from contract.request import Request
from contract.workload import LengthDist, generate_workload, write_workload
from estimator.data.runs import load_folder, run_loads
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.sim.calibrate import Calibration, calibrate, fit_steps, follow_level, live_levels, predict, step_function
from estimator.sim.measured import load_measured
from estimator.sim.scheduler import EngineConfig, Frontend, simulate
from estimator.sim.workload import Overheads, engine_config_from_manifest, run_workload
from tests.estimator.sim.test_simulate import EFFECTIVE, invoke, model_dir

CONFIG = {"tier": 0, "dtype": "float32"}
KNOWN = {"level": 1.3, "iteration_ms": 2.0, "frontend_request_ms": 3.0, "frontend_token_ms": 0.2}


def served_run(tmp_path: Path, model: IterationEstimator, rates: list[float], level: float = KNOWN["level"],
               count: int = 150, names: list[str] | None = None) -> Path:
    """A schema-3 serve-bench run of one load per rate, each 'served' by the replica with the KNOWN terms (loads
    named by `names`, as workload file stems; a repeated name repeats the workload)."""
    run = tmp_path / "served"
    texts, news = LengthDist.parse("uniform:32:256", "t"), LengthDist.parse("uniform:4:24", "n")
    records = []
    for i, rate in enumerate(rates):
        folder = run / "loads" / str(i)
        (folder / "requests").mkdir(parents=True)
        name = names[i] if names else f"rate-{rate:g}"
        seed = 10 + (names.index(name) if names else i)
        wl = generate_workload(rate, count, seed, texts, news, 4096)
        write_workload(folder / "workload.jsonl", wl)
        frame, _ = run_workload(wl, engine_config_from_manifest({"engine": EFFECTIVE}), model, CONFIG,
                                Overheads(iteration_ms=KNOWN["iteration_ms"]), scale=level,
                                frontend=Frontend(KNOWN["frontend_request_ms"], KNOWN["frontend_token_ms"]))
        frame = frame.rename(columns={"output_tokens": "new_tokens"}).drop(columns=["token_times_ms"])
        frame.assign(ok=True).to_parquet(folder / "requests" / "serve.parquet")
        tokens = frame["new_tokens"].sum()
        busy_s = (len(frame) * KNOWN["frontend_request_ms"] + tokens * KNOWN["frontend_token_ms"]) / 1e3
        (folder / "server_metrics.json").write_text(json.dumps({"cpu_s": {"api_server": busy_s}, "histograms": {}}))
        records.append({"index": i, "name": f"{i}-{name}", "source": {"file": f"{name}.jsonl"},
                        "requests_ok": len(frame), "status": "complete"})
    (run / "manifest.json").write_text(json.dumps({
        "schema_version": 3, "run_id": "served", "kind": "serve-bench", "engine": EFFECTIVE,
        "spec": {"axes": {"tier": [0]}}, "serve": {"layout": "loads"}, "loads": records,
    }))
    return run


def test_a_calibration_finds_the_level_and_the_front_end_and_predicts_a_heavier_load(tmp_path: Path) -> None:
    mdir = model_dir(tmp_path)
    model = IterationEstimator.load(mdir)
    run = served_run(tmp_path, model, [4.0, 12.0])
    Overheads(iteration_ms=KNOWN["iteration_ms"], fitted_on="known").save(mdir)  # the serving software's term
    cal = calibrate(model, mdir, load_measured(run, load=0), min_window_s=10.0)
    assert cal.level == pytest.approx(KNOWN["level"], rel=0.05)
    assert cal.iteration_ms == KNOWN["iteration_ms"] and cal.steps_from == "known"
    assert cal.frontend_request_ms + cal.frontend_token_ms > 0  # the measured CPU is spent somewhere
    assert abs(cal.fit["e2e_mean_error_pct"]) < 3.0
    heavy = load_measured(run, load=1)
    pred = predict(model, cal, heavy.workload)
    measured_mean = heavy.requests["e2e_ms"].mean()
    assert pred["e2e_ms"].mean() == pytest.approx(measured_mean, rel=0.08)
    # following: the level re-fitted on the last seconds of a load finds the same start's level, and so does a
    # live follower at every step of the load (its queue simulated), where the level did not move
    assert follow_level(model, cal, heavy, last_s=10.0) == pytest.approx(KNOWN["level"], rel=0.08)
    steps = live_levels(model, cal, heavy, start_level=1.0, step_s=3.0, window_s=6.0, min_requests=10)
    assert steps[0] == (0.0, 1.0) and len(steps) >= 3
    assert all(lv == pytest.approx(KNOWN["level"], rel=0.1) for _, lv in steps[1:])
    moving = predict(model, cal, heavy.workload, level_at=step_function([(0.0, cal.level), (5.0, 2 * cal.level)]))
    assert moving["e2e_ms"].mean() > 1.2 * pred["e2e_ms"].mean()  # a level that rises over the run slows it
    # saved and read back whole
    again = Calibration.read(cal.save(tmp_path / "cal"))
    assert again == cal


def test_the_per_iteration_term_is_told_from_the_level_across_loads(tmp_path: Path) -> None:
    mdir = model_dir(tmp_path)
    model = IterationEstimator.load(mdir)
    run = served_run(tmp_path, model, [3.0, 14.0], count=120)
    loads = [load_measured(run, load=i) for i in run_loads(run)]
    found = fit_steps(model, mdir, loads, grid=21)
    assert found.iteration_ms == pytest.approx(KNOWN["iteration_ms"], abs=1.0)
    assert found.fit is not None and max(found.fit["levels"]) / min(found.fit["levels"]) < 1.05
    with pytest.raises(EstimatorError, match="at least 2 loads"):
        fit_steps(model, mdir, loads[:1])


def test_the_front_end_is_a_queue_before_the_engine_and_after_each_token() -> None:
    engine = EngineConfig(max_num_seqs=8, max_num_batched_tokens=2048, block_size=16, num_blocks=256,
                          max_model_len=4096)
    reqs = [Request.numbered(i, 0.0, 10, 3) for i in range(3)]

    def ms(prefill_tokens: int, prefill_sq: float, decodes: int, ctx_sum: int, ctx_max: int) -> float:
        return 5.0

    plain = simulate(reqs, engine, ms)
    queued = simulate(reqs, engine, ms, frontend=Frontend(request_ms=4.0, token_ms=1.0))
    ready = [t.ready_s for t in queued.requests]
    assert ready == pytest.approx([0.004, 0.008, 0.012])  # one CPU: parsed one after another
    assert all(t.ready_s is None for t in plain.requests)
    for tr in queued.requests:  # each token reaches the client after the engine made it, in order
        assert all(d >= e for d, e in zip(tr.delivered_s, tr.token_times_s, strict=True))
        assert tr.delivered_s == sorted(tr.delivered_s)
        assert tr.client_times_s == tr.delivered_s
        assert tr.queued_s is not None and tr.first_scheduled_s is not None and tr.queued_s >= tr.ready_s


def test_readers_take_a_load_and_refuse_a_missing_one(tmp_path: Path) -> None:
    mdir = model_dir(tmp_path)
    run = served_run(tmp_path, IterationEstimator.load(mdir), [4.0, 8.0], count=40)
    assert run_loads(run) == [0, 1] and load_folder(run, 1) == run / "loads" / "1"
    with pytest.raises(EstimatorError, match="2 loads .*give --load i"):
        load_measured(run)
    with pytest.raises(EstimatorError, match="no finished load 5"):
        load_folder(run, 5)
    assert load_measured(run, load=1).label == "served load 1"
    code, out, err = invoke("simulate", str(mdir), "--measured", str(run), "--out", str(tmp_path / "s"))
    assert code == 2 and "give --load i" in err and len(err.strip().splitlines()) == 1
    code, out, err = invoke("simulate", str(mdir), "--measured", str(run), "--load", "1", "--out",
                            str(tmp_path / "s"))
    assert code == 0, err


def test_simulate_with_a_calibration_writes_requests_in_the_workload_order(tmp_path: Path) -> None:
    mdir = model_dir(tmp_path)
    run = served_run(tmp_path, IterationEstimator.load(mdir), [6.0], count=200)
    code, out, err = invoke("calibrate", str(mdir), str(run), "--out", str(tmp_path / "cal"))
    assert code == 0, err
    assert "level" in out and (tmp_path / "cal" / "calibration.json").is_file()
    wl = tmp_path / "b.jsonl"
    write_workload(wl, generate_workload(9.0, 50, 3, LengthDist.parse("uniform:32:256", "t"),
                                         LengthDist.parse("uniform:4:24", "n"), 4096))
    code, out, err = invoke("simulate", str(mdir), "--calibration", str(tmp_path / "cal"), "--workload", str(wl),
                            "--out", str(tmp_path / "s"))
    assert code == 0, err
    req = pd.read_csv(tmp_path / "s" / "requests.csv")
    assert list(req["request_id"]) == [f"req-{i:05d}" for i in range(50)]
    assert (req["ttft_ms"] > 0).all() and (req["e2e_ms"] >= req["ttft_ms"]).all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fit-overheads", "{run}"], "--calibration"),
        (["--no-overheads"], "--calibration"),
    ],
)
def test_a_calibration_refuses_a_second_way_to_give_overheads(tmp_path: Path, args: list[str], message: str) -> None:
    mdir = model_dir(tmp_path)
    run = served_run(tmp_path, IterationEstimator.load(mdir), [6.0], count=200)
    assert invoke("calibrate", str(mdir), str(run), "--out", str(tmp_path / "cal"))[0] == 0
    code, _, err = invoke("simulate", str(mdir), "--calibration", str(tmp_path / "cal"), "--rate", "3", "--count",
                          "5", *[a.format(run=run) for a in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_calibration_input_is_one_line(tmp_path: Path) -> None:
    mdir = model_dir(tmp_path)
    run = served_run(tmp_path, IterationEstimator.load(mdir), [6.0, 9.0], count=30)
    code, _, err = invoke("calibrate", str(mdir), str(run), "--load", "0", "--out", str(tmp_path / "c"))
    assert code == 2 and "at least 30 s" in err and len(err.strip().splitlines()) == 1  # 30 requests at 6/s: 5 s
    code, _, err = invoke("calibrate", str(mdir), str(run), "--load", "0")
    assert code == 2 and "give --out CAL" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "calibration.json").write_text('{"level": -1}')
    code, _, err = invoke("simulate", str(mdir), "--calibration", str(bad), "--rate", "3", "--count", "5")
    assert code == 2 and "calibration.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("calibrate", str(mdir), str(tmp_path / "nothing"), "--out", str(tmp_path / "c"))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_the_study_compares_each_load_with_the_floor_and_the_report_tables_it(tmp_path: Path) -> None:
    from estimator.report.build import load_calibration_study
    from estimator.report.document import Bullets, Table
    from estimator.report.sections.calibration import calibration_section

    mdir = model_dir(tmp_path)
    run = served_run(tmp_path, IterationEstimator.load(mdir), [5.0, 10.0, 5.0], count=160,
                     names=["cal", "rate-10", "cal"])
    manifest = json.loads((run / "manifest.json").read_text())  # load 1 as the first load of a rate search
    manifest["loads"][1]["source"] = {"rate_search": True, "rate_per_s": 10.0, "count": 160, "seed": 11,
                                      "text_tokens_dist": "uniform:32:256", "new_tokens_dist": "uniform:4:24",
                                      "context": 4096, "burstiness": 1.0}
    manifest["rate_search"] = {"lo": 10.0, "hi": 60.0, "steps": 2, "slo_ttft_ms": 500.0, "slo_tpot_ms": 60.0,
                               "target": 0.9, "tried": [{"rate_rps": 10.0, "attainment": 1.0, "met": True}],
                               "highest_rate_meeting_slo": 10.0}
    (run / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "study.json"
    code, text, err = invoke("experiment", "calibration", str(mdir), str(run), "--json", str(out), "--plots",
                             str(tmp_path), "--slo-ttft-ms", "500", "--slo-tpot-ms", "60")
    assert code == 0, err
    study = load_calibration_study(out)
    (start,) = study["starts"]
    assert [r["kind"] for r in start["rows"]] == ["cal", "rate-10", "cal"] and start["rows"][2]["repeat_of"] == 0
    assert start["floor"]["e2e_mean"] == pytest.approx(0.0, abs=1e-9)  # the replica serves a repeat identically
    heavy = start["rows"][1]
    assert abs(heavy["one_time"]["e2e_mean"]["value"]) < 10.0 and "followed" in heavy
    assert (tmp_path / "drift-served.png").read_bytes().startswith(b"\x89PNG")
    search = start["rate_search"]  # the same search on the calibrated replica: LO, then two bisection steps
    assert [t["rate_rps"] for t in search["predicted_steps"]][:1] == [10.0] and len(search["predicted_steps"]) == 3
    assert search["measured_rps"] == 10.0 and search["predicted_rps"] is not None
    sec = calibration_section(study, {"served": (tmp_path / "drift-served.png").read_bytes()})
    (table,) = [b for b in sec.blocks if isinstance(b, Table)]
    assert [row[0] for row in table.rows] == ["0 cal (calibration)", "1 rate-10", "2 cal (repeat of 0)",
                                             "server floor (repeat vs first)"]
    assert any("across 1 starts" in item for b in sec.blocks if isinstance(b, Bullets) for item in b.items)
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(EstimatorError, match="not a calibration study"):
        load_calibration_study(bad)
