"""`profile serve-bench`: a real `vllm serve` on a loopback port under vLLM's own client, and nothing left running."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import psutil
import pytest

from contract.manifest import REQUEST_COLUMNS
from contract.request import Request
from harness.drivers.serve import requests_from_client
from harness.drivers.vllm_server import parse_metrics, server_command
from tests.conftest import run_profile


def _ours(run_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names the run folder (the server's model folder lives there)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(run_dir) in cmd:
            out.append(p)
    return out


@pytest.mark.slow
def test_serve_bench_serves_two_loads_on_one_start_and_stops_the_server(tmp_path: Path) -> None:
    res = run_profile(
        "serve-bench",
        "--rates",
        "4,8",
        "--count",
        "5",
        "--prewarm",
        "2",
        "--seed",
        "3",
        "--text-tokens-dist",
        "uniform:16:64",
        "--new-tokens-dist",
        "uniform:2:6",
        "--out",
        str(tmp_path),
        "--name",
        "sb",
        "--engine-arg",
        "enforce_eager=true",  # no compile warm-up: this test is about the server's start, the client and the stop
    )
    run = tmp_path / "sb"
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "serve-bench" and manifest["status"] == "complete"
    assert manifest["schema_version"] == 3 and manifest["serve"]["layout"] == "loads"
    assert [(r["index"], r["requests_ok"], r["status"]) for r in manifest["loads"]] == [(0, 5, "complete"),
                                                                                       (1, 5, "complete")]
    engine = manifest["engine"]
    assert engine["num_gpu_blocks"] > 0 and engine["block_size"] == 128 and engine["max_model_len"] == 4096
    assert engine["async_scheduling"] is False  # the CPU build turns it off
    assert any(e["arg"] == "enable_prefix_caching" for e in manifest["engine_exceptions"])
    assert "--enforce-eager" in manifest["server"]["command"]
    assert (run / "prewarm" / "client.json").is_file()  # served, not counted
    for i in (0, 1):
        load = run / "loads" / str(i)
        req = pd.read_parquet(load / "requests")
        workload = [json.loads(x) for x in (load / "workload.jsonl").read_text().splitlines()]
        assert list(req["new_tokens"]) == [w["new_tokens"] for w in workload]  # the client asked, ignore_eos
        assert list(req["text_tokens"]) == [w["text_tokens"] for w in workload]
        assert (req["ttft_ms"] > 0).all() and (req["e2e_ms"] >= req["ttft_ms"]).all()
        assert (load / "client.json").is_file() and (load / "trace.jsonl").is_file()
        scrapes = [json.loads(x) for x in (load / "metrics.jsonl").read_text().splitlines()]
        assert len(scrapes) >= 2 and all(s["mono_s"] > 0 for s in scrapes)  # at its start and its end at least
        figures = json.loads((load / "server_metrics.json").read_text())
        # the window's deltas: this load's five requests only, not the prewarm's or the other load's
        assert figures["histograms"]["vllm:e2e_request_latency_seconds"]["count"] == 5
    assert not (run / "server-model").exists()
    assert not _ours(run), "a server process outlived the command"


def test_bad_workload_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "w.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 3}\n')
    res = run_profile("serve-bench", "--workload", str(bad), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "timed-trace line lacks output_length" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_server_command_turns_engine_args_into_flags(tmp_path: Path) -> None:
    cmd = server_command(
        {
            "enable_prefix_caching": False,
            "dtype": "float32",
            "kv_cache_memory_bytes": 5,
            "skip_tokenizer_init": True,
            "hf_overrides": {"a": 1},
        },
        tmp_path,
        8123,
        "m",
    )
    assert "--no-enable-prefix-caching" in cmd and "--skip-tokenizer-init" not in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"a": 1}


def test_client_results_become_request_rows() -> None:
    detail = {
        "ttfts": [0.1, 0.0],
        "latencies": [0.5, 0.0],
        "itls": [[0.2, 0.2], []],
        "output_lens": [3, 0],
        "input_lens": [10, 12],
        "start_times": [100.0, 100.5],
        "errors": ["", "boom"],
    }
    rows = requests_from_client(detail, [Request.numbered(0, 0.0, 10, 3), Request.numbered(1, 0.5, 12, 4)])
    first = rows.iloc[0]
    assert set(REQUEST_COLUMNS) <= set(rows.columns)  # what the estimator's readers rely on
    assert first["ttft_ms"] == pytest.approx(100) and first["tpot_ms"] == pytest.approx(200)
    assert first["token_times_ms"] == pytest.approx([100, 300, 500]) and first["ok"]
    assert not rows.iloc[1]["ok"] and rows.iloc[1]["error"] == "boom"
    assert rows.iloc[1]["sent_s"] == pytest.approx(0.5)


def test_metrics_text_gives_the_cache_config_and_totals() -> None:
    text = (
        '# HELP x\nvllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="1024"} 1.0\n'
        'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 2.5\n'
        'vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 4.0\n'
    )
    m = parse_metrics(text)
    assert m["cache_config"]["num_gpu_blocks"] == "1024" and m["cache_config"]["block_size"] == "128"
    assert m["totals"]["vllm:e2e_request_latency_seconds_count"] == 4.0


@pytest.mark.slow
def test_a_server_that_dies_mid_load_is_one_line_and_the_loads_before_it_are_kept(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"arrival_s": 0.1 * i, "text_tokens": 32, "new_tokens": 3}) + "\n"
                             for i in range(4)))
    second.write_text("".join(json.dumps({"arrival_s": 0.5 * i, "text_tokens": 32, "new_tokens": 3}) + "\n"
                              for i in range(200)))  # 100 s: the server is killed long before its end
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.cli", "serve-bench", "--workload", str(first), "--workload", str(second),
           "--prewarm", "0", "--out", str(out), "--name", "sb", "--engine-arg", "enforce_eager=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "sb"
    deadline = time.monotonic() + 400
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
        if len(manifest.get("loads") or []) == 1 and not killed:
            time.sleep(3.0)  # into the second load
            for p in _ours(run):
                if "api_server" in " ".join(p.cmdline()):
                    p.kill()
                    killed = True
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=120)
    assert killed, stdout + stderr
    assert proc.returncode != 0
    lines = [x for x in stderr.strip().splitlines() if x.startswith("failed:")]
    assert len(lines) == 1 and "the server exited" in lines[0] and "1-b" in lines[0], stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and [r["status"] for r in manifest["loads"]] == ["complete"]
    assert len(pd.read_parquet(run / "loads" / "0" / "requests")) == 4  # the load before it, kept
    assert not _ours(run), "a server process outlived the command"


def test_a_rate_search_bisects_between_the_highest_met_and_the_lowest_missed_rate() -> None:
    from harness.drivers.serve import Load, RateSearch

    def frame(share_ok: float) -> pd.DataFrame:
        n = 20
        k = round(share_ok * n)
        return pd.DataFrame({"ok": [True] * n, "ttft_ms": [10.0] * k + [999.0] * (n - k), "tpot_ms": [5.0] * n})

    search = RateSearch(10.0, 40.0, 3, slo_ttft_ms=100.0, slo_tpot_ms=20.0, make=lambda r, i: Load(str(i), []))
    capacity = 27.0  # the 'server' meets the SLO up to here
    served = []
    while (rate := search.next_rate()) is not None:
        served.append(rate)
        search.record(rate, frame(1.0 if rate <= capacity else 0.5))
    assert served == [10.0, 25.0, 32.5, 28.75]  # LO, then halves of [highest met, lowest missed or HI]
    summary = search.summary()
    assert summary["highest_rate_meeting_slo"] == 25.0 and [t["met"] for t in summary["tried"]] == [1, 1, 0, 0]
    failing = RateSearch(10.0, 40.0, 3, 100.0, 20.0, make=lambda r, i: Load(str(i), []))
    failing.record(failing.next_rate() or 0.0, frame(0.8))  # 80% < 90%: even LO misses
    assert failing.next_rate() is None and failing.summary()["highest_rate_meeting_slo"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--search", "10,40", "--count", "5"], "--search needs --slo-ttft-ms and --slo-tpot-ms"),
        (["--search", "40,10", "--count", "5", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"], "0 < LO < HI"),
        (["--search", "10,40", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"], "--search needs --count"),
        (["--rate", "3", "--count", "5", "--slo-ttft-ms", "1"], "go with --search"),
    ],
)
def test_bad_rate_search_is_one_line_and_starts_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    res = run_profile("serve-bench", *args, "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
