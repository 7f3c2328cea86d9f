"""`profile serve-bench`: a real `vllm serve` on a loopback port under vLLM's own client, and nothing left running."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import psutil
import pytest

from contract.manifest import REQUEST_COLUMNS
from contract.request import Request
from harness.drivers.serve import parse_metrics, requests_from_client, server_command
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
