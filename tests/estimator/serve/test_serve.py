"""`estimate serve` (estimator/serve/): its predictions against the replica they come from, the online level and
drift, the HTTP API's answers to good and bad input, and the command's start, bind and stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from contract.policy import Held
from contract.request import Declared, Request
from estimator.errors import EstimatorError
from estimator.serve.predictor import GRID, Predictor, grid_neighbours, load_predictor
from estimator.sim.scheduler import simulate
from estimator.sim.workload import iteration_fn

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "studies" / "scheduler" / "model"
SETUP = ROOT / "studies" / "scheduler" / "classes" / "setup.json"
LENGTHS = ROOT / "studies" / "scheduler" / "classes" / "lengths-train.jsonl"
FEATURES = {"kv_cache_percentage": 0.02, "input_token_length": 200, "num_request_waiting": 1,
            "num_request_running": 2, "num_tokens_generated": 5, "prefix_cache_score": 0.0}


@pytest.fixture
def predictor() -> Predictor:
    return load_predictor(MODEL, engine=SETUP, lengths=LENGTHS)


@pytest.fixture
def client(predictor: Predictor):  # type: ignore[no-untyped-def]
    from starlette.testclient import TestClient

    from estimator.serve.app import build_app

    return TestClient(build_app(predictor))


def test_native_is_the_replica_from_the_engine_state(predictor: Predictor) -> None:
    d = Declared("new", 0.0, 300, 256, "chat")
    alone = predictor.native(d, [], output_tokens=40)
    fn = iteration_fn(predictor.model, predictor.config)
    o = predictor.overheads
    run = simulate([Request.make("new", 0.0, 300, 40, max_tokens=256)], predictor.engine, fn, o.iteration_ms,
                   o.sequence_ms)
    times = run.requests[0].token_times_s
    assert alone.ttft_ms == pytest.approx(times[0] * 1e3 + o.request_ms)
    assert alone.e2e_ms == pytest.approx(times[-1] * 1e3 + o.request_ms)
    assert len(alone.step_ms) == 39 and alone.tpot_ms == pytest.approx(sum(alone.step_ms) / 39)
    assert alone.queue_ms == 0 and 0 < alone.prefill_ms <= alone.ttft_ms
    # a full engine (max_num_seqs running, one waiting ahead) delays the first token; the unknown output length is
    # the learned one for its class, not the declared cap
    held = [Held(Declared(f"r{i}", 0.0, 600, 256, "code"), 0, 0.1, 600, 2, True)
            for i in range(predictor.engine.max_num_seqs)]
    held.append(Held(Declared("w", 0.0, 600, 256, "code"), 0, 0.05, 0, 0, False))
    busy = predictor.native(d, held)
    assert busy.ttft_ms > alone.ttft_ms + 5 and busy.queue_ms > 0
    assert not busy.output_known and busy.assumed_outputs == predictor.outputs(d) < 256


def test_the_llmd_table_is_the_replica_at_its_grid_points_and_interpolates_between(predictor: Predictor) -> None:
    lo, hi, w = grid_neighbours(200)
    assert lo in GRID and hi in GRID and lo < 200 < hi and 0 < w < 1 and grid_neighbours(hi) == (hi, hi, 0.0)
    at_lo = predictor.llmd(0.0, lo, 0, 0, 0, 0.0)
    at_hi = predictor.llmd(0.0, hi, 0, 0, 0, 0.0)
    between = predictor.llmd(0.0, 200, 0, 0, 0, 0.0)
    assert at_lo[0] < between[0] < at_hi[0]
    alone = predictor.native(Declared("x", 0.0, lo, 1), [], output_tokens=1)
    assert at_lo[0] == pytest.approx(alone.ttft_ms)
    # a lookup is answered from the table: the same features again, the same answer, no new entry
    size = len(predictor._table)
    assert predictor.llmd(**{k: v for k, v in FEATURES.items()}) == predictor.llmd(**FEATURES)
    assert len(predictor._table) > size
    size = len(predictor._table)
    predictor.llmd(**FEATURES)
    assert len(predictor._table) == size
    # load raises the TTFT; a prefix-cache hit lowers it; beyond the table the waiting queue extrapolates
    waits = [predictor.llmd(0.02, 200, w, 4, 0, 0.0)[0] for w in (0, 4, 64, 200)]
    assert waits == sorted(waits) and waits[0] < waits[1] < waits[2] < waits[3]
    assert predictor.llmd(0.0, 800, 0, 0, 0, 0.75)[0] < predictor.llmd(0.0, 800, 0, 0, 0, 0.0)[0]


def test_actuals_move_the_level_and_the_drift_pairs_them(predictor: Predictor) -> None:
    d = Declared("x", 0.0, 300, 256, "chat")
    before = predictor.native(d, [], output_tokens=40)
    ttft_before = predictor.llmd(**FEATURES)[0]
    assert predictor.drift()["pairs"] == 0
    slow = 2.0 * before.tpot_ms  # the engine runs twice as slow as the model says
    for _ in range(10):
        pair = predictor.ingest(d, [], 40, 2.0 * before.ttft_ms, slow)
    assert 1.5 < predictor.level < 2.0 and pair["level"] == predictor.level
    after = predictor.native(d, [], output_tokens=40)
    assert after.tpot_ms == pytest.approx(before.tpot_ms * predictor.level, rel=0.05)
    assert predictor.llmd(**FEATURES)[0] > ttft_before
    drift = predictor.drift()
    assert drift["pairs"] == 10 and drift["tpot_bias_pct"] < 0 and drift["tpot_mape_pct"] == -drift["tpot_bias_pct"]
    # the first pair was predicted at level 1: half the measured TPOT
    assert pair["tpot_error_pct"] > -50 and predictor._pairs[0][2] == pytest.approx(slow / 2)


def test_http_answers_llmd_native_actuals_health_and_metrics(client) -> None:  # type: ignore[no-untyped-def]
    got = client.post("/predict", json={**FEATURES, "an_extra_field": 1})
    assert got.status_code == 200
    body = got.json()
    assert set(body) == {"ttft_ms", "tpot_ms", "predicted_at", "model_type", "objective_type", "quantile",
                         "last_model_load"} and body["ttft_ms"] > 0 and body["tpot_ms"] > 0
    bulk = client.post("/predict/bulk", json={"requests": [FEATURES] * 100 + [{**FEATURES, "num_request_running": -1}]})
    b = bulk.json()
    assert bulk.status_code == 200 and b["total_requests"] == 101 and b["successful_predictions"] == 100
    assert b["failed_predictions"] == 1 and b["errors"][0]["index"] == 100 and b["predictions"][100] is None
    assert b["predictions"][0]["ttft_ms"] == pytest.approx(body["ttft_ms"]) and b["processing_time_ms"] > 0
    q = {"request": {"text_tokens": 300, "max_tokens": 256, "client_class": "chat"},
         "held": [{"text_tokens": 600, "max_tokens": 256, "computed_tokens": 600, "outputs": 3, "running": True}]}
    native = client.post("/v1/predict", json=q).json()
    assert native["e2e_ms"] > native["ttft_ms"] > 0 and len(native["step_ms"]) == native["output_tokens"] - 1
    pair = client.post("/v1/actuals", json={**q, "output_tokens": 40, "ttft_ms": 30.0, "tpot_ms": 4.0}).json()
    assert pair["actual_ttft_ms"] == 30.0 and pair["drift"]["pairs"] == 1
    assert client.get("/healthz").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert 'estimate_serve_requests_total{endpoint="predict",status="200"} 1' in metrics
    assert 'estimate_serve_request_seconds_count{endpoint="predict_bulk"} 1' in metrics
    assert "estimate_serve_actuals_total 1" in metrics and "estimate_serve_drift_pairs 1" in metrics


@pytest.mark.parametrize(("path", "payload", "status", "says"), [
    ("/predict", b"{not json", 400, "malformed JSON"),
    ("/predict", {k: v for k, v in FEATURES.items() if k != "input_token_length"}, 422, "input_token_length"),
    ("/predict", {**FEATURES, "kv_cache_percentage": 40}, 422, "kv_cache_percentage"),
    ("/predict", {**FEATURES, "num_request_waiting": -2}, 422, "num_request_waiting"),
    ("/predict", {**FEATURES, "input_token_length": 10**7}, 422, "max_model_len"),
    ("/predict", [1, 2], 422, "valid dictionary"),
    ("/predict/bulk", {"requests": "all"}, 422, "requests"),
    ("/v1/predict", {"request": {"text_tokens": 10, "max_tokens": 5}, "config": {"tier": 7}}, 422, "never trained"),
    ("/v1/predict", {"request": {"text_tokens": 10, "max_tokens": 5, "path": "/etc/passwd"}}, 422, "path"),
    ("/v1/predict", {"request": {"text_tokens": 4000, "max_tokens": 500}, "output_tokens": 200}, 422, "max_model_len"),
    ("/v1/actuals", {"request": {"text_tokens": 10, "max_tokens": 5}, "output_tokens": 5, "ttft_ms": -1}, 422,
     "ttft_ms"),
    ("/predict", b"[" * (1 << 20) + b"]", 413, "bytes"),
])
def test_bad_input_is_a_4xx_with_one_line_and_the_server_goes_on(client, path, payload, status,  # type: ignore[no-untyped-def]
                                                                  says) -> None:
    got = client.post(path, content=payload) if isinstance(payload, bytes) else client.post(path, json=payload)
    assert got.status_code == status, got.text
    detail = got.json()["detail"]
    assert says in detail and "\n" not in detail
    assert client.post("/predict", json=FEATURES).status_code == 200


def test_no_route_takes_a_path() -> None:
    from estimator.serve.app import build_app

    app = build_app(load_predictor(MODEL, engine=SETUP))
    assert sorted(r.path for r in app.routes) == ["/healthz", "/metrics", "/predict", "/predict/bulk", "/v1/actuals",
                                                   "/v1/predict"]


def test_bad_flags_are_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, says in ([[str(MODEL)], "--engine"], [[str(tmp_path)], "iteration"],
                       [[str(MODEL), "--engine", str(LENGTHS)], "--engine"],
                       [[str(MODEL), "--engine", str(SETUP), "--config", "tier=9"], "config"]):
        proc = subprocess.run([sys.executable, "-m", "estimator.cli", "serve", *args, "--no-warm"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_command_binds_loopback_serves_and_stops_cleanly(stop: signal.Signals) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "estimator.cli", "serve", str(MODEL), "--engine", str(SETUP),
                             "--port", str(port), "--no-warm"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps(FEATURES).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["ttft_ms"] > 0
        listening = [c for c in _listening(proc.pid) if c.laddr.port == port]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
        os.kill(proc.pid, stop)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert f"stopped ({stop.name})" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _listening(pid: int) -> list:  # type: ignore[type-arg]
    import psutil

    return [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]


def test_a_calibration_sets_the_engine_the_level_and_the_front_end(tmp_path: Path, predictor: Predictor) -> None:
    from dataclasses import asdict

    cal = {"model": str(MODEL), "run": "r", "load": 0, "config": predictor.config, "engine": asdict(predictor.engine),
           "level": 2.0, "frontend_request_ms": 3.0, "frontend_token_ms": 0.0, "window_s": 60.0, "requests": 100,
           "fit": {}, "created_at": "2026-12-06T00:00:00Z"}
    (tmp_path / "calibration.json").write_text(json.dumps(cal))
    calibrated = load_predictor(MODEL, calibration=tmp_path)
    assert calibrated.level == 2.0 and "calibration" in calibrated.source
    d = Declared("x", 0.0, 300, 256)
    slow, base = calibrated.native(d, [], output_tokens=20), predictor.native(d, [], output_tokens=20)
    assert slow.tpot_ms == pytest.approx(2 * base.tpot_ms, rel=0.05)
    assert slow.ttft_ms > 2 * (base.ttft_ms - predictor.overheads.request_ms)  # the level and the front end's 3 ms
    with pytest.raises(EstimatorError, match="drop --engine"):
        load_predictor(MODEL, calibration=tmp_path, engine=SETUP)
