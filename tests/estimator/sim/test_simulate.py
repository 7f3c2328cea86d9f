"""`estimate simulate` on a hand-written iteration model: outputs, the capacity curve and goodput, the overhead fit,
and bad input (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from contract.slo import Goodput, goodput
from contract.workload import LengthDist, generate_workload, write_workload
from estimator.cli import app
from estimator.model.iteration import ITERATION_FORMAT, TERMS, IterationConfigFit, IterationEstimator, IterationMeta
from estimator.sim.measured import compare, fit_overheads, load_measured, paired
from estimator.sim.workload import Overheads, run_workload

EFFECTIVE = {
    "max_num_seqs": 16,
    "max_num_batched_tokens": 2048,
    "block_size": 128,
    "num_gpu_blocks": 512,
    "max_model_len": 4096,
    "enable_chunked_prefill": True,
    "dtype": "float32",
}
COEF = [8.0, 0.2, 1e-5, 0.3, 0.002, 0.0]  # ms: intercept, per prefill token, per token², per decode, per ctx


def model_dir(tmp_path: Path) -> Path:
    meta = IterationMeta(
        format_version=ITERATION_FORMAT,
        created_at="2026-11-29T00:00:00+00:00",
        runs=["r"],
        config_columns=["tier", "dtype"],
        terms=list(TERMS),
        configs=[IterationConfigFit(config={"tier": 0, "dtype": "float32"}, rows=10, coef_ms=COEF)],
        rows=10,
        composition_range={},
    )
    return IterationEstimator(meta).save(tmp_path / "model")


def engine_run(tmp_path: Path) -> Path:
    run = tmp_path / "engine-run"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(
        json.dumps(
            {"schema_version": 2, "run_id": "engine-run", "kind": "replay", "engine_starts": [{"effective": EFFECTIVE}]}
        )
    )
    return run


def invoke(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_simulate_from_arrivals_writes_requests_and_summary(tmp_path: Path) -> None:
    m, e = model_dir(tmp_path), engine_run(tmp_path)
    code, out, err = invoke(
        "simulate", str(m), "--engine", str(e), "--rate", "5", "--count", "60", "--out", str(tmp_path / "o")
    )
    assert code == 0, err
    assert "60 requests" in out and "ttft_ms" in out
    req = pd.read_csv(tmp_path / "o" / "requests.csv")
    assert len(req) == 60 and (req["e2e_ms"] >= req["ttft_ms"]).all() and (req["ttft_ms"] > 0).all()
    tpot = (req["e2e_ms"] - req["ttft_ms"]) / (req["output_tokens"] - 1)
    assert np.allclose(req["tpot_ms"].dropna(), tpot[req["output_tokens"] > 1])
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["configs"][0]["summary"]["requests"] == 60


def test_rates_give_a_curve_and_goodput(tmp_path: Path) -> None:
    m, e = model_dir(tmp_path), engine_run(tmp_path)
    code, out, err = invoke(
        "simulate",
        str(m),
        "--engine",
        str(e),
        "--rates",
        "1,4,16,64",
        "--count",
        "80",
        "--slo-ttft-ms",
        "400",
        "--slo-tpot-ms",
        "40",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    curve = pd.read_csv(tmp_path / "o" / "curve.csv")
    assert list(curve["rate_rps"]) == [1, 4, 16, 64]
    assert curve["ttft_ms_p90"].iloc[-1] > curve["ttft_ms_p90"].iloc[0]
    assert "goodput" in out
    assert goodput([1, 2, 3, 4], [1.0, 0.95, 0.5, 0.97]) == Goodput(2.0 + 0.05 / 0.45)  # a dip ends it
    assert goodput([1, 2], [0.5, 1.0]) == Goodput(0.0)
    assert goodput([1, 2], [0.95, 0.91]) == Goodput(2.0, censored=True)


def test_overheads_fitted_on_measured_runs_are_recovered(tmp_path: Path) -> None:
    """'Measured' runs made by the replica with known overheads, at two loads: the fit finds them again."""
    model = IterationEstimator.load(model_dir(tmp_path))
    known = Overheads(iteration_ms=3.0, request_ms=25.0, sequence_ms=0.4)
    texts, news = LengthDist.parse("uniform:32:512", "t"), LengthDist.parse("uniform:4:32", "n")
    runs = []
    for rate, seed in ((3.0, 1), (20.0, 2)):
        run = engine_run(tmp_path / f"r{seed}")
        wl = generate_workload(rate, 80, seed, texts, news, 4096)
        write_workload(run / "workload.jsonl", wl)
        frame, _ = run_workload(wl, load_engine(run), model, {"tier": 0, "dtype": "float32"}, known)
        (run / "requests").mkdir()
        frame.rename(columns={"output_tokens": "new_tokens"}).drop(columns=["token_times_ms"]).to_parquet(
            run / "requests" / "seg-000.parquet"
        )
        runs.append(load_measured(run))
    found = fit_overheads(runs, model)
    assert found.request_ms == pytest.approx(25.0, abs=2.0)
    assert found.iteration_ms == pytest.approx(3.0, abs=1.0)
    assert found.sequence_ms == pytest.approx(0.4, abs=0.15)
    sim, _ = run_workload(runs[1].workload, runs[1].engine, model, runs[1].config, found)
    cmp = compare(paired(sim, runs[1].requests))
    assert abs(cmp["e2e_ms"]["mean"]["error_pct"]["value"]) < 3
    found.save(tmp_path / "model")
    assert Overheads.load(tmp_path / "model").sequence_ms == found.sequence_ms


def load_engine(run: Path):  # noqa: ANN201
    from estimator.sim.workload import engine_config_from_manifest

    return engine_config_from_manifest(json.loads((run / "manifest.json").read_text()))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rate", "5"], "give --engine RUN"),
        (["--engine", "ENGINE", "--rate", "5", "--slo-ttft-ms", "100"], "give both --slo-ttft-ms and --slo-tpot-ms"),
        (
            ["--engine", "ENGINE", "--rate", "5", "--config", "tier=3", "--config", "dtype=float32"],
            "no iteration model",
        ),
        (["--engine", "ENGINE", "--rate", "5", "--config", "tier=3"], "config lacks axis value(s) for dtype"),
        (["--engine", "ENGINE", "--workload", "BAD"], "line 1: arrival_s must be a finite number"),
        (["--engine", "ENGINE", "--rates", "1,x"], "expected comma-separated numbers"),
        (["--engine", "ENGINE", "--rate", "5", "--policy", "lifo"], "--policy must be fcfs or priority"),
        (["--engine", "ENGINE"], "give arrivals"),
    ],
)
def test_bad_input_is_exit_2_with_one_line(tmp_path: Path, extra: list[str], message: str) -> None:
    m, e = model_dir(tmp_path), engine_run(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": "soon", "text_tokens": 3, "new_tokens": 2}\n')
    args = [str(e) if a == "ENGINE" else str(bad) if a == "BAD" else a for a in extra]
    code, _, err = invoke("simulate", str(m), *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
