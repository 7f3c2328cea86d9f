"""`profile replay` and `profile workload` (registered on the `profile` app by harness/cli/app.py).

Thin, like the rest of the CLI: parse flags, build a spec and a workload, call harness/drivers/replay.py, print.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from contract.request import Request
from harness.rundata.spec import ServingSpec, SpecError, build_serving
from harness.rundata.store import RunStore, StoreError
from harness.rundata.workload import (
    LengthDist,
    generate_workload,
    read_workload,
    write_trace,
    write_workload,
)
from harness.telemetry.sources import TelemetryError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

out = Console()
if not out.is_terminal:
    out = Console(width=160)
err = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def pick_device() -> str:
    """CUDA only where NVML sees a GPU and the CUDA vLLM build is installed (harness/engine/device.py)."""
    from harness.engine.device import choose_device

    return choose_device(None, None)[0]


def generated(rate: float | None, count: int | None, seed: int, text_dist: str, new_dist: str,
               context: int, burstiness: float = 1.0) -> tuple[list[Request], dict[str, Any]]:
    if rate is None or count is None:
        raise SpecError("give a workload: --workload FILE, or --rate R and --count N to generate one")
    texts, news = LengthDist.parse(text_dist, "text-tokens-dist"), LengthDist.parse(new_dist, "new-tokens-dist")
    requests = generate_workload(rate, count, seed, texts, news, context, burstiness)
    return requests, {"generator": "poisson" if burstiness == 1.0 else "gamma", "burstiness": burstiness,
                      "rate_per_s": rate, "count": count, "seed": seed,
                      "text_tokens_dist": str(texts), "new_tokens_dist": str(news), "context": context}


BURSTINESS_HELP = "gamma shape of the gaps between arrivals: 1 = Poisson, < 1 burstier (as vllm bench serve's)"


def workload_command(
    rate: float = typer.Option(..., help="mean arrival rate, requests per second (Poisson arrivals)"),
    count: int = typer.Option(..., help="number of requests"),
    seed: int = typer.Option(0, help="seed: the same seed gives the same file"),
    text_tokens_dist: str = typer.Option("uniform:32:512", help="prompt lengths: fixed:N, uniform:LO:HI or "
                                                                  "lognormal:MEDIAN:SIGMA"),
    new_tokens_dist: str = typer.Option("uniform:8:64", help="new tokens per request (same forms)"),
    burstiness: float = typer.Option(1.0, help=BURSTINESS_HELP),
    tier: int = typer.Option(0, help="model tier whose context clips the lengths"),
    model: str | None = typer.Option(None, help="a local model folder (or preset name) instead of the ladder"),
    trace: bool = typer.Option(False, help="write vLLM's timed-trace format (vllm bench serve --dataset-name "
                                           "timed_trace) instead of the project's"),
    out_file: Path = typer.Option(..., "--out", help="JSONL file to write"),
) -> None:
    """Write a seeded workload file: Poisson (or gamma) arrivals, lengths from the given distributions."""
    try:
        context = build_serving(device=pick_device(), tier=tier, model=model).context()
        requests, _ = generated(rate, count, seed, text_tokens_dist, new_tokens_dist, context, burstiness)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        (write_trace if trace else write_workload)(out_file, requests)
    except (SpecError, OSError) as e:
        raise fail(str(e)) from None
    span = requests[-1].arrival_s
    out.print(f"wrote {len(requests)} requests over {span:.2f} s to {out_file}", highlight=False)


def replay_command(
    workload: Path | None = typer.Option(None, help="JSONL workload: arrival_s, text_tokens, new_tokens[, prompt]; "
                                                    "or vLLM's timed trace (timestamp, input_length, output_length)"),
    rate: float | None = typer.Option(None, help="generate the workload: mean arrival rate (requests/s)"),
    count: int | None = typer.Option(None, help="generate the workload: number of requests"),
    seed: int = typer.Option(0, help="seed for a generated workload and for prompt choice"),
    text_tokens_dist: str = typer.Option("uniform:32:512", help="generated prompt lengths (see profile workload)"),
    new_tokens_dist: str = typer.Option("uniform:8:64", help="generated new tokens per request"),
    burstiness: float = typer.Option(1.0, help=BURSTINESS_HELP),
    policy: str = typer.Option("fcfs", help="request priority at arrival: fcfs (vLLM's default), prompt (shortest "
                                            "prompt first), file (the workload's `priority` values, lower first), "
                                            "oracle (latency alone, from --oracle-run), estimate (shortest "
                                            "predicted latency, --policy-model) or estimate-admit (and reject "
                                            "a request predicted to miss its --slo)"),
    policy_model: Path | None = typer.Option(None, help="--policy estimate/estimate-admit: the iteration model "
                                                        "(estimate train RUN --target iteration)"),
    policy_lengths: Path | None = typer.Option(None, help="--policy estimate/estimate-admit: a training workload "
                                                          "(JSONL) to learn output lengths from; without it a "
                                                          "request is assumed to generate its declared max_tokens"),
    slo: list[str] = typer.Option([], help="--policy estimate-admit: MIN_PROMPT:TTFT_MS:TPOT_MS or "
                                           "CLASS:TTFT_MS:TPOT_MS per request class, repeatable (e.g. --slo "
                                           "0:200:20 --slo 768:1500:40 --slo code:300:20)"),
    oracle_run: Path | None = typer.Option(None, help="--policy oracle: a --solo replay of the same workload"),
    solo: bool = typer.Option(False, help="send each request only when the engine is idle: latencies alone"),
    tier: int = typer.Option(0, help="model tier (one engine config per replay)"),
    model: str | None = typer.Option(None, help="a local model folder (or preset name) instead of the ladder"),
    top_k: int = typer.Option(0, help="sampling top_k (0 = off)"),
    blocks: int | None = typer.Option(None, help="KV-cache block size in tokens (default: 128 on CPU, 16 on CUDA)"),
    max_num_seqs: int | None = typer.Option(None, help="vLLM max_num_seqs (default: vLLM's serving default)"),
    prompts: Path | None = typer.Option(None, help="prompt text for requests without one (default: the corpus)"),
    warmup: int | None = typer.Option(None, help="untimed single requests after the engine start"),
    flush_every: int = typer.Option(16, help="write the files after this many finished requests (and when idle)"),
    out_dir: Path = typer.Option(Path("results"), "--out", help="folder that receives results/<run_id>/"),
    name: str | None = typer.Option(None, help="run folder name under --out"),
    resume: Path | None = typer.Option(None, help="finish the unfinished requests of this replay run"),
    inprocess: bool = typer.Option(False, help="engine core in this process (NOT how vLLM serves; labelled)"),
    trust_remote_code: bool = typer.Option(False, help="allow a model folder's own code to run"),
    verbose: bool = typer.Option(False, help="show vLLM's own output live (it always goes to RUN/engine.log)"),
    quiet: bool = typer.Option(False, help="fewer progress lines"),
) -> None:
    """Replay timed requests on one real engine (continuous batching); one row per engine iteration."""
    from harness.drivers.replay import ReplayOptions, run_replay, summary
    from harness.engine.log import EngineOutput

    try:
        options = ReplayOptions(out_root=out_dir, resume_dir=resume, run_id=name, flush_every=max(flush_every, 0),
                                verbose=verbose, solo=solo)
        serving: ServingSpec | None = None
        requests = None
        if resume is None:

            serving = build_serving(
                device=pick_device(), tier=tier, model=model, top_k=top_k, blocks=blocks, max_num_seqs=max_num_seqs,
                warmup_requests=warmup, seed=seed, prompts=str(prompts) if prompts else None,
                engine_mode="inprocess" if inprocess else "multiprocess", trust_remote_code=trust_remote_code,
            )
            if workload is not None:
                if rate is not None or count is not None:
                    raise SpecError("give either --workload or --rate/--count, not both")
                requests = read_workload(workload, allow_trace=True)
                options.source = {"file": str(workload)}
            else:
                requests, options.source = generated(rate, count, seed, text_tokens_dist, new_tokens_dist,
                                                      serving.context(), burstiness)
            from harness.drivers.policy import apply_policy, live_policy

            requests, serving = apply_policy(policy, serving, requests, oracle_run)
            options.source = {**options.source, "policy": policy}
            if policy in ("estimate", "estimate-admit"):
                if policy_model is None:
                    raise SpecError(f"--policy {policy} needs --policy-model MODEL (an iteration model)")
                policy_options: dict[str, Any] = {"model": str(policy_model)}
                if policy_lengths is not None:
                    policy_options["lengths"] = str(policy_lengths)
                if policy == "estimate-admit":
                    policy_options["slo"] = list(slo)
                options.policy = live_policy(policy, policy_options)
                options.source["policy_options"] = policy_options
        else:
            RunStore.open(resume)  # not a run, or another schema: fails here, before vLLM is imported
        engine_output: EngineOutput | None = None
        if EngineOutput.possible():
            engine_output = EngineOutput(verbose)
            out.file, err.file = engine_output.stdout, engine_output.stderr
            engine_output.start()
        options.engine_output = engine_output
        last = [0.0]

        def report(event: str, data: dict[str, Any]) -> None:
            if event == "log":
                print(f"[{time.strftime('%H:%M:%S')}] {data['message']}", file=err.file, flush=True)
            elif event == "progress" and (not quiet or time.monotonic() - last[0] > 30):
                last[0] = time.monotonic()
                print(f"[{time.strftime('%H:%M:%S')}] {data['segment_id']}: {data['finished']}/{data['todo']} "
                      f"requests finished, {data['iterations']} iterations", file=err.file, flush=True)

        result = run_replay(serving, requests, options, report)
    except (SpecError, StoreError, TelemetryError) as e:
        raise fail(str(e)) from None
    table = summary(result.run_dir)
    if not table.empty:
        t = Table(title=f"Replay: {result.run_dir}")
        for col in table.columns:
            t.add_column(str(col), justify="right")
        for _, row in table.iterrows():
            t.add_row(*["" if isinstance(v, float) and math.isnan(v) else str(v) for v in row])
        out.print(t)
    out.print(f"status: {result.status}; requests done {result.requests_done}/{result.requests_total}; "
              f"results in {result.run_dir}", highlight=False)
    if result.error:
        err.print(f"failed: {escape(result.error)}", highlight=False, soft_wrap=True)
    if result.status == "interrupted":
        err.print(f"interrupted: resume with  profile replay --resume {result.run_dir}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.status != "complete":
        raise typer.Exit(EXIT_FAILED)
