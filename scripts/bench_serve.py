"""Benchmark `estimate serve` over loopback with an open-loop HTTP load client (run it alone on the machine).

The server (`estimate serve MODEL --engine ENGINE`, its llm-d table warmed) runs pinned to one core, this client to
the other. Each rate sends POST /predict at fixed intervals for `--seconds`, over at most `--connections` kept-alive
connections, whether or not earlier answers came back (open loop); a request's latency runs from its scheduled send
time to its answer, so a server that falls behind is charged for the wait (no coordinated omission). The client's
own lateness (actual send - scheduled) is printed beside it: where it is large the client, not the server, is the
limit. Then /predict/bulk with 100 candidates, one call at a time.

    .venv/bin/python scripts/bench_serve.py [--model studies/scheduler/model] [--engine .../setup.json]
        [--rates 200,1000] [--search 500,1500,2000,3000,4000] [--seconds 10] [--json out.json]

Prints p50/p99 per rate and the highest rate run whose p99 <= 5 ms; --json writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def features(rng: random.Random) -> dict[str, Any]:
    """One candidate pod's llm-d features, spread over what a small CPU server sees."""
    return {"kv_cache_percentage": round(rng.uniform(0.0, 0.06), 3), "input_token_length": rng.randint(16, 1536),
            "num_request_waiting": rng.choice([0, 0, 0, 1, 2, 4, 8]), "num_request_running": rng.randint(0, 4),
            "num_tokens_generated": rng.randint(0, 200), "prefix_cache_score": rng.choice([0.0, 0.0, 0.5])}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def open_loop(url: str, rate: float, seconds: float, connections: int, seed: int) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(seed)
    bodies = [json.dumps(features(rng)).encode() for _ in range(512)]
    n = int(rate * seconds)
    lat_ms: list[float] = []
    late_ms: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers={"Content-Type": "application/json"}) as session:
        t0 = time.perf_counter() + 0.05

        async def one(k: int, due: float) -> None:
            nonlocal errors
            late_ms.append((time.perf_counter() - due) * 1e3)
            try:
                async with session.post(url, data=bodies[k % len(bodies)]) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            lat_ms.append((time.perf_counter() - due) * 1e3)

        tasks = []
        for k in range(n):  # the dispatcher: each request at its time, whatever came back
            due = t0 + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(k, due)))
        await asyncio.gather(*tasks)
        span = time.perf_counter() - t0
    return {"rate_rps": rate, "requests": n, "errors": errors, "achieved_rps": n / span,
            "p50_ms": pct(lat_ms, 50), "p99_ms": pct(lat_ms, 99), "max_ms": max(lat_ms),
            "client_late_p99_ms": pct(late_ms, 99)}


def bulk(url: str, calls: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    lat_ms, inside_ms = [], []
    for _ in range(calls):
        body = json.dumps({"requests": [features(rng) for _ in range(100)]}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as r:
            got = json.loads(r.read())
        lat_ms.append((time.perf_counter() - t) * 1e3)
        inside_ms.append(got["processing_time_ms"])
        assert got["successful_predictions"] == 100, got["errors"][:2]
    return {"candidates": 100, "calls": calls, "p50_ms": pct(lat_ms, 50), "p99_ms": pct(lat_ms, 99),
            "server_processing_p50_ms": pct(inside_ms, 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "studies/scheduler/model"))
    ap.add_argument("--engine", default=str(ROOT / "studies/scheduler/classes/setup.json"))
    ap.add_argument("--rates", default="200,1000")
    ap.add_argument("--search", default="500,1500,2000,3000,4000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[-1], cpus[0]) if len(cpus) > 1 else (cpus[0], cpus[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["taskset", "-c", str(server_cpu), sys.executable, "-m", "estimator.cli", "serve", a.model,
           "--engine", a.engine, "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    os.sched_setaffinity(0, {client_cpu})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {server.communicate()[1][-2000:]}") from None
                time.sleep(0.3)
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "?")
        print(f"estimate serve on 127.0.0.1:{port}, server pinned to CPU {server_cpu}, client to CPU {client_cpu} "
              f"({cpu}); open loop, {a.seconds:g} s per rate, <= {a.connections} connections")
        asyncio.run(open_loop(base + "/predict", 200, 2.0, a.connections, 99))  # warm-up: the table's misses
        results = []
        rates = [float(r) for r in a.rates.split(",")] + [float(r) for r in a.search.split(",") if r]
        for k, rate in enumerate(sorted(set(rates))):
            r = asyncio.run(open_loop(base + "/predict", rate, a.seconds, a.connections, k))
            results.append(r)
            print(f"/predict {rate:>6.0f} req/s: p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max "
                  f"{r['max_ms']:.1f} ms, achieved {r['achieved_rps']:.0f} req/s, errors {r['errors']}, client "
                  f"late p99 {r['client_late_p99_ms']:.2f} ms")
        ok = [r["rate_rps"] for r in results if r["p99_ms"] <= 5.0 and r["errors"] == 0]
        best = max(ok) if ok else None
        print(f"highest rate run with p99 <= 5 ms: {best:.0f} req/s" if best else "no rate run had p99 <= 5 ms")
        b = bulk(base + "/predict/bulk", 200, 7)
        print(f"/predict/bulk of 100: p50 {b['p50_ms']:.2f} ms, p99 {b['p99_ms']:.2f} ms (server's own processing "
              f"p50 {b['server_processing_p50_ms']:.2f} ms)")
        if a.json:
            Path(a.json).write_text(json.dumps({"cpu": cpu, "predict": results, "highest_rate_p99_le_5ms": best,
                                                "bulk": b}, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
