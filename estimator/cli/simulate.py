"""`estimate simulate`: a workload's per-request latencies predicted from its arrivals (estimator/sim/).

Registered on the `estimate` app by estimator/cli/app.py. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from estimator.cli.common import run_command
from estimator.errors import EstimatorError


def _config(model: Any, given: list[str]) -> list[dict[str, Any]]:
    """The configs to simulate: the given axis values (AXIS=VALUE), else every trained config."""
    if not given:
        return [dict(c) for c in model.trained_configs]
    config: dict[str, Any] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EstimatorError(f"--config {item!r}: expected AXIS=VALUE, e.g. tier=0")
        try:
            config[key] = int(value)
        except ValueError:
            try:
                config[key] = float(value)
            except ValueError:
                config[key] = value
    model.coefficients(config)  # an unknown config fails here, naming the trained ones
    return [config]


def _label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.1f}"


def simulate(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder with an iteration model (estimate train --target "
            "iteration); its serving.json, if any, holds the overheads."
        ),
    ],
    workload: Annotated[
        Path | None,
        typer.Option(
            help="Arrivals: the project's workload JSONL or vLLM's timed "
            "trace (timestamp, input_length, output_length)."
        ),
    ] = None,
    measured: Annotated[
        Path | None,
        typer.Option(
            help="A replay or serve-bench run: simulate its workload on its engine and compare with what it measured."
        ),
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Generate arrivals: mean rate (requests/s).")] = None,
    count: Annotated[int, typer.Option(help="Generated requests.")] = 200,
    seed: Annotated[int, typer.Option(help="Generator seed (same generator as profile workload).")] = 0,
    text_tokens_dist: Annotated[str, typer.Option(help="Generated prompt lengths.")] = "uniform:32:512",
    new_tokens_dist: Annotated[str, typer.Option(help="Generated new tokens.")] = "uniform:8:64",
    burstiness: Annotated[float, typer.Option(help="Gamma shape of the arrival gaps (1 = Poisson).")] = 1.0,
    rates: Annotated[
        str | None, typer.Option(help="Comma-separated rates: the latency-vs-rate curve (and goodput with the SLOs).")
    ] = None,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="TTFT SLO (ms) for attainment and goodput.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="TPOT SLO (ms) for attainment and goodput.")] = None,
    engine: Annotated[
        Path | None,
        typer.Option(
            help="A run whose manifest gives the engine's scheduler settings (max_num_seqs, token budget, KV blocks)."
        ),
    ] = None,
    config: Annotated[
        list[str] | None, typer.Option(help="Config axis value AXIS=VALUE (repeatable); default: every trained config.")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="fcfs or priority (each request's `priority` from the workload, else 0).")
    ] = "fcfs",
    fit_overheads: Annotated[
        list[Path] | None,
        typer.Option(
            help="Serve-bench (or replay) runs to fit the serving overheads on; saved as MODEL_DIR/serving.json."
        ),
    ] = None,
    gap_overheads: Annotated[
        list[Path] | None,
        typer.Option(
            help="Replay runs to learn the overheads from per iteration instead (the harness's gap between "
            "iterations against batch size, and each request's add lag); saved as MODEL_DIR/serving.json."
        ),
    ] = None,
    no_overheads: Annotated[bool, typer.Option("--no-overheads", help="Ignore MODEL_DIR/serving.json.")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for requests.csv, summary.json, cdf.png, curve.csv.")] = None,
) -> None:
    """Predict a workload from its arrivals: queueing, TTFT, TPOT, end-to-end per request (vLLM's benchmark
    definitions), with a replica of vLLM's v1 scheduler and the iteration model."""
    from contract.slo import goodput
    from contract.workload import LengthDist, WorkloadError, generate_workload, read_workload
    from estimator.model.iteration import IterationEstimator
    from estimator.sim import measured as meas
    from estimator.sim.workload import (
        Overheads,
        capacity_curve,
        engine_config_from_manifest,
        run_workload,
        slo_attainment,
        summarize,
    )

    def go() -> None:
        if policy not in ("fcfs", "priority"):
            raise EstimatorError(f"--policy must be fcfs or priority, got {policy!r}")
        if (slo_ttft_ms is None) != (slo_tpot_ms is None):
            raise EstimatorError("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
        model = IterationEstimator.load(model_dir)
        if fit_overheads:
            runs = [meas.load_measured(p, policy) for p in fit_overheads]
            t0 = time.perf_counter()
            found = meas.fit_overheads(runs, model)
            found.save(model_dir)
            fit = found.fit or {}
            typer.echo(
                f"overheads fitted on {len(runs)} run(s) in {time.perf_counter() - t0:.1f} s: "
                f"per iteration {found.iteration_ms:.3f} ms, per sequence in an iteration {found.sequence_ms:.3f} ms, "
                f"per request {found.request_ms:.2f} ms "
                f"(TTFT MAPE {fit.get('ttft_mape_pct', math.nan):.1f}%, end-to-end MAPE "
                f"{fit.get('e2e_mape_pct', math.nan):.1f}%); saved {model_dir / 'serving.json'}"
            )
        if gap_overheads:
            if fit_overheads:
                raise EstimatorError("give --fit-overheads or --gap-overheads, not both")
            learned = meas.gap_overheads(gap_overheads)
            learned.save(model_dir)
            fit = learned.fit or {}
            typer.echo(
                f"overheads learned from {fit.get('gaps')} gaps between iterations: per iteration "
                f"{learned.iteration_ms:.3f} ms + {learned.sequence_ms:.3f} ms per sequence "
                f"(R² {fit.get('r2', 0):.2f}; "
                f"median gap {fit.get('gap_median_ms', math.nan):.2f} ms, outside the engine core "
                f"{fit.get('outside_core_median_ms', math.nan):.2f} ms), per request {learned.request_ms:.2f} ms "
                f"(median add lag); saved {model_dir / 'serving.json'}"
            )
        overheads = Overheads() if no_overheads else Overheads.load(model_dir)
        sources = [x for x in (workload, measured, rate) if x is not None]
        if len(sources) > 1:
            raise EstimatorError("give one of --workload, --measured and --rate")
        if not sources and not rates:
            if fit_overheads or gap_overheads:
                return
            raise EstimatorError("give arrivals: --workload FILE, --measured RUN, --rate R or --rates R1,R2,...")
        run_m = meas.load_measured(measured, policy) if measured else None
        if run_m is not None:
            eng = run_m.engine
        elif engine is not None:
            from estimator.data.runs import read_manifest

            eng = engine_config_from_manifest(read_manifest(engine), policy)
        else:
            raise EstimatorError("give --engine RUN (a run whose manifest records the engine's effective config)")
        configs = [run_m.config] if run_m is not None and not config else _config(model, config or [])
        folder = out
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            texts = LengthDist.parse(text_tokens_dist, "text-tokens-dist")
            news = LengthDist.parse(new_tokens_dist, "new-tokens-dist")

            def make(r: float) -> list[Any]:
                return generate_workload(r, count, seed, texts, news, eng.max_model_len, burstiness)

            if run_m is not None:
                requests = run_m.workload
            elif workload is not None:
                requests = read_workload(workload, allow_trace=True)
            elif rate is not None:
                requests = make(rate)
            else:
                requests = None
        except WorkloadError as exc:
            raise EstimatorError(str(exc)) from None
        summary: dict[str, Any] = {"engine": eng.__dict__, "overheads": overheads.__dict__, "configs": []}
        for cfg in configs:
            entry: dict[str, Any] = {"config": cfg}
            if requests is not None:
                t0 = time.perf_counter()
                frame, run = run_workload(requests, eng, model, cfg, overheads)
                elapsed = time.perf_counter() - t0
                s = summarize(frame)
                entry.update(summary=s, simulate_s=elapsed, iterations=run.iterations)
                typer.echo(
                    f"[{_label(cfg)}] {len(frame)} requests, {run.iterations} iterations simulated in "
                    f"{elapsed * 1e3:.0f} ms; throughput {s.get('throughput_rps', math.nan):.2f} req/s"
                )
                for m in ("queue_ms", "ttft_ms", "tpot_ms", "e2e_ms"):
                    typer.echo(
                        f"  {m:9s} " + "  ".join(f"{st} {_fmt(s[m][st])}" for st in ("mean", "p50", "p90", "p99"))
                    )
                if slo_ttft_ms is not None and slo_tpot_ms is not None:
                    entry["slo_attainment"] = slo_attainment(frame, slo_ttft_ms, slo_tpot_ms)
                    typer.echo(
                        f"  SLO attainment (TTFT <= {slo_ttft_ms:g} ms and TPOT <= {slo_tpot_ms:g} ms): "
                        f"{entry['slo_attainment'] * 100:.1f}%"
                    )
                if run_m is not None:
                    pairs = meas.paired(frame, run_m.requests)
                    cmp = meas.compare(pairs)
                    entry["comparison"] = cmp
                    typer.echo(
                        f"  against {run_m.kind} {run_m.path.name} ({cmp['requests']} requests), "
                        "error of the statistic, % [95% interval]:"
                    )
                    for m in ("ttft_ms", "tpot_ms", "e2e_ms"):
                        c = cmp.get(m)
                        if c:
                            typer.echo(
                                f"    {m:8s} MAPE {c['mape_pct']['value']:5.1f}%  "
                                + "  ".join(
                                    f"{st} {c[st]['error_pct']['value']:+.1f} [{c[st]['error_pct']['lo']:+.1f}, "
                                    f"{c[st]['error_pct']['hi']:+.1f}]"
                                    for st in ("mean", "p50", "p90", "p99")
                                )
                            )
                    if folder is not None:
                        meas.cdf_plot(pairs, folder / "cdf.png", f"{run_m.path.name}: simulated vs measured")
                        pairs.reset_index().to_csv(folder / "paired.csv", index=False)
                if folder is not None:
                    frame.assign(token_times_ms=frame["token_times_ms"].map(json.dumps)).to_csv(
                        folder / (f"requests-{len(summary['configs'])}.csv" if len(configs) > 1 else "requests.csv"),
                        index=False,
                    )
            if rates:
                try:
                    values = [float(x) for x in rates.split(",") if x.strip()]
                except ValueError:
                    raise EstimatorError(f"--rates {rates!r}: expected comma-separated numbers") from None
                if not values or min(values) <= 0:
                    raise EstimatorError("--rates: give positive rates")
                t0 = time.perf_counter()

                def one(reqs: Any, c: dict[str, Any] = cfg) -> Any:
                    return run_workload(reqs, eng, model, c, overheads)[0]

                try:
                    curve = capacity_curve(values, make, one, slo_ttft_ms, slo_tpot_ms)
                except WorkloadError as exc:
                    raise EstimatorError(str(exc)) from None
                entry["curve"] = curve.to_dict(orient="records")
                entry["curve_s"] = time.perf_counter() - t0
                typer.echo(f"[{_label(cfg)}] latency vs rate ({count} requests per rate, {entry['curve_s']:.2f} s):")
                for row in entry["curve"]:
                    att = row.get("slo_attainment")
                    typer.echo(
                        f"  {row['rate_rps']:7.2f} req/s: throughput {row['throughput_rps']:.2f}, TTFT p90 "
                        f"{_fmt(row['ttft_ms_p90'])} ms, TPOT p90 {_fmt(row['tpot_ms_p90'])} ms, E2E p90 "
                        f"{_fmt(row['e2e_ms_p90'])} ms" + ("" if att is None else f", SLO met {att * 100:.0f}%")
                    )
                if "slo_attainment" in curve:
                    good = goodput(curve["rate_rps"].tolist(), curve["slo_attainment"].tolist())
                    entry["goodput_rps"], entry["goodput_censored"] = good.rate_rps, good.censored
                    typer.echo(f"  goodput (>= 90% meet both SLOs, contract/slo.py): {'>= ' if good.censored else ''}"
                               f"{_fmt(good.rate_rps)} req/s")
                if folder is not None:
                    curve.to_csv(
                        folder / (f"curve-{len(summary['configs'])}.csv" if len(configs) > 1 else "curve.csv"),
                        index=False,
                    )
            summary["configs"].append(entry)
        if len(configs) > 1 and all("goodput_rps" in e for e in summary["configs"]):
            best = max(summary["configs"], key=lambda e: e["goodput_rps"])
            typer.echo(f"highest goodput: {_label(best['config'])} at {_fmt(best['goodput_rps'])} req/s")
        if folder is not None:
            (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
            typer.echo(f"wrote {folder}")

    run_command(go)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)
