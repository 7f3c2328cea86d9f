"""`profile serve-bench` (registered on the `profile` app by harness/cli/app.py): a live `vllm serve` under
vLLM's own client on one workload (harness/drivers/serve.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from harness.cli.replay import (
    BURSTINESS_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    err,
    fail,
    generated,
    out,
    pick_device,
)
from harness.rundata.spec import SpecError, build_serving
from harness.rundata.store import StoreError
from harness.rundata.workload import read_workload

if TYPE_CHECKING:
    from harness.drivers.serve import Load
from harness.telemetry.sources import TelemetryError


def engine_value(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as JSON where it parses (true, 8, 0.5, "x"), else as text."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--engine-arg {item!r}: expected KEY=VALUE, e.g. enforce_eager=true")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return key.strip(), value


def serve_loads(workloads: list[Path], rate: float | None, rates: str | None, count: int | None, seed: int,
                text_dist: str, new_dist: str, burstiness: float, context: int, search: bool = False) -> list[Load]:
    """The loads asked for: each --workload file, or one generated load per rate of --rates (or --rate); with a
    rate search, the --workload files (if any) before it."""
    from harness.drivers.serve import Load

    if workloads and (rate is not None or rates is not None or (count is not None and not search)):
        raise SpecError("give either --workload or --rate/--rates with --count, not both")
    if search and (rate is not None or rates is not None):
        raise SpecError("--search generates its own loads: drop --rate/--rates (--workload files are served first)")
    if search and not workloads:
        return []
    if rate is not None and rates is not None:
        raise SpecError("give --rate or --rates, not both")
    if workloads:
        return [Load(f"{i}-{w.stem}", read_workload(w, allow_trace=True), {"file": str(w)})
                for i, w in enumerate(workloads)]
    values = [rate] if rates is None else _rates(rates)
    loads = []
    for i, r in enumerate(values):
        requests, source = generated(r, count, seed + i, text_dist, new_dist, context, burstiness)
        loads.append(Load(f"{i}-rate-{r:g}", requests, source))
    return loads


def rate_search(text: str | None, steps: int, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
                count: int | None, seed: int, text_dist: str, new_dist: str, burstiness: float,
                context: int) -> Any:
    """--search LO,HI: a RateSearch whose loads are generated at each rate (--count requests, seed --seed + index);
    None without --search. SpecError (one line) on a bad range or a missing SLO or count."""
    if text is None:
        if slo_ttft_ms is not None or slo_tpot_ms is not None:
            raise SpecError("--slo-ttft-ms/--slo-tpot-ms go with --search LO,HI")
        return None
    from harness.drivers.serve import Load, RateSearch

    bounds = _rates(text)
    if len(bounds) != 2 or bounds[0] >= bounds[1]:
        raise SpecError(f"--search {text!r}: expected LO,HI with 0 < LO < HI, e.g. 10,40")
    if slo_ttft_ms is None or slo_tpot_ms is None or min(slo_ttft_ms, slo_tpot_ms) <= 0:
        raise SpecError("--search needs --slo-ttft-ms and --slo-tpot-ms (> 0): the SLO whose highest rate it finds")
    if count is None or count < 1:
        raise SpecError("--search needs --count N: the requests of each load it serves")
    if steps < 1:
        raise SpecError(f"--search-steps must be >= 1, got {steps}")

    def make(rate: float, index: int) -> Load:
        requests, source = generated(rate, count, seed + index, text_dist, new_dist, context, burstiness)
        return Load(f"{index}-search-{rate:g}", requests, {**source, "rate_search": True})

    return RateSearch(bounds[0], bounds[1], steps, slo_ttft_ms, slo_tpot_ms, make)


def _rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--rates {text!r}: expected comma-separated numbers, e.g. 2,4,6") from None
    if not values or min(values) <= 0:
        raise SpecError(f"--rates {text!r}: give positive rates")
    return values


def serve_bench_command(
    workload: list[Path] = typer.Option(
        [], help="JSONL workload (the project's, or vLLM's timed trace); repeat for several loads, served in order "
        "on one server start (the same file twice serves it twice)"),
    rate: float | None = typer.Option(None, help="generate the workload: mean arrival rate (requests/s)"),
    rates: str | None = typer.Option(None, help="generate one load per rate, e.g. 2,4,6 (with --count; seeds "
                                                 "--seed, --seed+1, ...)"),
    count: int | None = typer.Option(None, help="generate the workload: number of requests (per load)"),
    prewarm: int = typer.Option(16, help="requests served first and not counted (the first load's first ones)"),
    search: str | None = typer.Option(None, help="after the loads, search LO,HI for the highest rate meeting the SLO "
                                                 "(--slo-ttft-ms, --slo-tpot-ms; --count requests per load)"),
    search_steps: int = typer.Option(4, help="--search: bisection loads after the one at LO"),
    slo_ttft_ms: float | None = typer.Option(None, help="--search: TTFT objective (ms)"),
    slo_tpot_ms: float | None = typer.Option(None, help="--search: TPOT objective (ms)"),
    seed: int = typer.Option(0, help="seed for a generated workload"),
    text_tokens_dist: str = typer.Option("uniform:32:512", help="generated prompt lengths (see profile workload)"),
    new_tokens_dist: str = typer.Option("uniform:8:64", help="generated new tokens per request"),
    burstiness: float = typer.Option(1.0, help=BURSTINESS_HELP),
    tier: int = typer.Option(0, help="model tier"),
    model: str | None = typer.Option(None, help="a local model folder (or preset name) instead of the ladder"),
    blocks: int | None = typer.Option(None, help="KV-cache block size in tokens (default: 128 on CPU, 16 on CUDA)"),
    max_num_seqs: int | None = typer.Option(None, help="vLLM max_num_seqs (default: vLLM's serving default)"),
    engine_arg: list[str] = typer.Option(
        [],
        "--engine-arg",
        help="an engine argument KEY=VALUE for the server, as "
        "a spec's [engine] table (repeatable), e.g. enforce_eager=true",
    ),
    port: int | None = typer.Option(None, help="loopback port (default: a free one)"),
    startup_timeout: float = typer.Option(600.0, help="seconds to wait for the server's /health"),
    out_dir: Path = typer.Option(Path("results"), "--out", help="folder that receives results/<run_id>/"),
    name: str | None = typer.Option(None, help="run folder name under --out"),
) -> None:
    """Serve a workload on a live `vllm serve` (127.0.0.1) driven by `vllm bench serve` (timed trace); keep its
    per-request results and /metrics as a run folder, and stop the server."""
    from harness.drivers.replay import replay_spec
    from harness.drivers.serve import ServeOptions, check_serve_spec, run_serve_bench
    from harness.engine.steady import steady_settings

    try:
        serving = build_serving(device=pick_device(), tier=tier, model=model, blocks=blocks, max_num_seqs=max_num_seqs,
                                engine=dict(engine_value(item) for item in engine_arg))
        if prewarm < 0:
            raise SpecError(f"--prewarm must be >= 0, got {prewarm}")
        try:
            steady_settings()  # a malformed steady-engine variable: one line, before a server starts
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        options = ServeOptions(out_root=out_dir, run_id=name, port=port, startup_timeout_s=startup_timeout,
                               prewarm=prewarm)
        loads = serve_loads(workload, rate, rates, count, seed, text_tokens_dist, new_tokens_dist, burstiness,
                            serving.context(), search is not None)
        searching = rate_search(search, search_steps, slo_ttft_ms, slo_tpot_ms, count, seed, text_tokens_dist,
                                new_tokens_dist, burstiness, serving.context())
        first = loads or ([searching.make(searching.lo, 0)] if searching is not None else [])
        options.source = {"loads": [load.source for load in loads]}
        check_serve_spec(replay_spec(serving, [r for load in first for r in load.requests]))  # one line if bad

        def report(event: str, info: dict[str, Any]) -> None:
            stamp = time.strftime("%H:%M:%S")
            if event == "log":
                print(f"[{stamp}] {info['message']}", file=err.file, flush=True)
            elif event == "load":
                s = info["client_summary"]
                print(f"[{stamp}]   ok {info['requests_ok']}/{info['requests_total']} in {info['window_s']:.1f} s; "
                      f"E2E mean {s.get('mean_e2el_ms', 0):.0f} ms, TTFT mean {s.get('mean_ttft_ms', 0):.0f} ms, "
                      f"TPOT mean {s.get('mean_tpot_ms', 0):.1f} ms", file=err.file, flush=True)

        result = run_serve_bench(serving, loads, options, report, searching)
    except (SpecError, StoreError, TelemetryError) as e:
        raise fail(str(e)) from None
    out.print(
        f"status: {result.status}; loads done {result.loads_done}; requests ok {result.requests_ok}/"
        f"{result.requests_total}; results in "
        f"{result.run_dir}",
        highlight=False,
    )
    if result.error:
        err.print(f"failed: {escape(result.error)}", highlight=False, soft_wrap=True)
    if result.status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.status != "complete":
        raise typer.Exit(EXIT_FAILED)
