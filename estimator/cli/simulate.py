"""`estimate simulate`: a workload's per-request latencies predicted from its arrivals (estimator/sim/).

Registered on the `estimate` app by estimator/cli/app.py. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from estimator.cli.common import run_command
from estimator.errors import EstimatorError


def chosen_configs(model: Any, given: list[str]) -> list[dict[str, Any]]:
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
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="A calibration of the running server (estimate calibrate): its level, front end, engine limits and "
            "config; replaces serving.json, --engine and --config."
        ),
    ] = None,
    load: Annotated[
        int | None, typer.Option(help="Which load of a serve-bench run of several (--measured, --fit-overheads).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for requests.csv, summary.json, cdf.png, curve.csv.")] = None,
) -> None:
    """Predict a workload from its arrivals: queueing, TTFT, TPOT, end-to-end per request (vLLM's benchmark
    definitions), with a replica of vLLM's v1 scheduler and the iteration model."""
    opts = SimulateOptions(
        model_dir=model_dir, workload=workload, measured=measured, rate=rate, count=count, seed=seed,
        text_tokens_dist=text_tokens_dist, new_tokens_dist=new_tokens_dist, burstiness=burstiness, rates=rates,
        slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, engine=engine, config=config or [], policy=policy,
        fit_overheads=fit_overheads or [], gap_overheads=gap_overheads or [], no_overheads=no_overheads, out=out,
        calibration=calibration, load=load,
    )
    run_command(lambda: run_simulate(opts))


@dataclass
class SimulateOptions:
    """`estimate simulate`'s flags, as given."""

    model_dir: Path
    workload: Path | None
    measured: Path | None
    rate: float | None
    count: int
    seed: int
    text_tokens_dist: str
    new_tokens_dist: str
    burstiness: float
    rates: str | None
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    engine: Path | None
    config: list[str]
    policy: str
    fit_overheads: list[Path]
    gap_overheads: list[Path]
    no_overheads: bool
    out: Path | None
    calibration: Path | None = None
    load: int | None = None


def run_simulate(o: SimulateOptions) -> None:
    """What the command does, in order: check the flags, fit or learn overheads, read or generate the arrivals,
    then per config the workload and the latency-vs-rate curve, and the files."""
    from estimator.model.iteration import IterationEstimator
    from estimator.sim.workload import Overheads, run_workload

    if o.policy not in ("fcfs", "priority"):
        raise EstimatorError(f"--policy must be fcfs or priority, got {o.policy!r}")
    if (o.slo_ttft_ms is None) != (o.slo_tpot_ms is None):
        raise EstimatorError("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
    if o.fit_overheads and o.gap_overheads:
        raise EstimatorError("give --fit-overheads or --gap-overheads, not both")
    cal = None
    if o.calibration is not None:
        from estimator.sim.calibrate import Calibration

        given = [f for f, v in (("--fit-overheads", o.fit_overheads), ("--gap-overheads", o.gap_overheads),
                                ("--no-overheads", o.no_overheads), ("--engine", o.engine), ("--config", o.config))
                 if v]
        if given:
            raise EstimatorError(f"--calibration gives the overheads, the engine and the config: drop {given[0]}")
        cal = Calibration.read(o.calibration)
    model = IterationEstimator.load(o.model_dir)
    if o.fit_overheads:
        fit_serving_overheads(model, o)
    if o.gap_overheads:
        learn_gap_overheads(o)
    overheads = Overheads() if o.no_overheads or cal is not None else Overheads.load(o.model_dir)
    sources = [x for x in (o.workload, o.measured, o.rate) if x is not None]
    if len(sources) > 1:
        raise EstimatorError("give one of --workload, --measured and --rate")
    if not sources and not o.rates:
        if o.fit_overheads or o.gap_overheads:
            return
        raise EstimatorError("give arrivals: --workload FILE, --measured RUN, --rate R or --rates R1,R2,...")
    arrivals = Arrivals.of(o, model, cal)
    if o.out is not None:
        o.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"engine": arrivals.engine.__dict__, "overheads": overheads.__dict__, "configs": []}
    if cal is not None:
        summary["calibration"] = cal.model_dump(mode="json")

    def sim(reqs: list[Any], cfg: dict[str, Any]) -> tuple[Any, Any]:
        """One workload on the engine: calibrated (level, per-iteration term, front end) or with the serving
        overheads."""
        if cal is not None:
            return run_workload(reqs, arrivals.engine, model, cfg, cal.overheads(), scale=cal.level,
                                frontend=cal.frontend())
        return run_workload(reqs, arrivals.engine, model, cfg, overheads)

    many = len(arrivals.configs) > 1
    for k, cfg in enumerate(arrivals.configs):
        entry: dict[str, Any] = {"config": cfg}
        suffix = f"-{k}" if many else ""
        if arrivals.requests is not None:
            entry.update(simulate_workload(sim, cfg, arrivals, o, suffix))
        if o.rates:
            entry.update(rate_curve(sim, cfg, arrivals, o, suffix))
        summary["configs"].append(entry)
    if many and all("goodput_rps" in e for e in summary["configs"]):
        best = max(summary["configs"], key=lambda e: e["goodput_rps"])
        typer.echo(f"highest goodput: {_label(best['config'])} at {_fmt(best['goodput_rps'])} req/s")
    if o.out is not None:
        (o.out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
        typer.echo(f"wrote {o.out}")


def fit_serving_overheads(model: Any, o: SimulateOptions) -> None:
    """--fit-overheads: the serving overheads fitted on measured runs (every load of a run of several, unless
    --load names one: loads at different rates tell the per-iteration term from the per-sequence one), saved as
    MODEL_DIR/serving.json."""
    from estimator.data.runs import run_loads
    from estimator.sim import measured as meas

    runs = [meas.load_measured(p, o.policy, i) for p in o.fit_overheads
            for i in ([o.load] if o.load is not None else run_loads(p))]
    t0 = time.perf_counter()
    found = meas.fit_overheads(runs, model)
    found.save(o.model_dir)
    fit = found.fit or {}
    typer.echo(
        f"overheads fitted on {len(runs)} load(s) in {time.perf_counter() - t0:.1f} s: "
        f"per iteration {found.iteration_ms:.3f} ms, per sequence in an iteration {found.sequence_ms:.3f} ms, "
        f"per request {found.request_ms:.2f} ms "
        f"(TTFT MAPE {fit.get('ttft_mape_pct', math.nan):.1f}%, end-to-end MAPE "
        f"{fit.get('e2e_mape_pct', math.nan):.1f}%); saved {o.model_dir / 'serving.json'}"
    )


def learn_gap_overheads(o: SimulateOptions) -> None:
    """--gap-overheads: the overheads learned from replays' gaps between iterations, saved as serving.json."""
    from estimator.sim import measured as meas

    learned = meas.gap_overheads(o.gap_overheads)
    learned.save(o.model_dir)
    fit = learned.fit or {}
    typer.echo(
        f"overheads learned from {fit.get('gaps')} gaps between iterations: per iteration "
        f"{learned.iteration_ms:.3f} ms + {learned.sequence_ms:.3f} ms per sequence "
        f"(R² {fit.get('r2', 0):.2f}; "
        f"median gap {fit.get('gap_median_ms', math.nan):.2f} ms, outside the engine core "
        f"{fit.get('outside_core_median_ms', math.nan):.2f} ms), per request {learned.request_ms:.2f} ms "
        f"(median add lag); saved {o.model_dir / 'serving.json'}"
    )


@dataclass
class Arrivals:
    """What is simulated: the engine, the configs, the requests (None: only a curve) and the generator."""

    engine: Any
    configs: list[dict[str, Any]]
    requests: list[Any] | None
    make: Callable[[float], list[Any]]
    measured: Any = None  # the measured run, with --measured

    @classmethod
    def of(cls, o: SimulateOptions, model: Any, cal: Any = None) -> Arrivals:
        from contract.workload import LengthDist, WorkloadError, generate_workload, read_workload
        from estimator.sim import measured as meas
        from estimator.sim.workload import engine_config_from_manifest

        run_m = meas.load_measured(o.measured, o.policy, o.load) if o.measured else None
        if cal is not None:
            eng = cal.engine_config()
        elif run_m is not None:
            eng = run_m.engine
        elif o.engine is not None:
            from estimator.data.runs import read_manifest

            eng = engine_config_from_manifest(read_manifest(o.engine), o.policy)
        else:
            raise EstimatorError("give --engine RUN (a run whose manifest records the engine's effective config)")
        if cal is not None:
            configs = [dict(cal.config)]
        elif run_m is not None and not o.config:
            configs = [run_m.config]
        else:
            configs = chosen_configs(model, o.config)
        try:
            texts = LengthDist.parse(o.text_tokens_dist, "text-tokens-dist")
            news = LengthDist.parse(o.new_tokens_dist, "new-tokens-dist")

            def make(r: float) -> list[Any]:
                try:
                    return generate_workload(r, o.count, o.seed, texts, news, eng.max_model_len, o.burstiness)
                except WorkloadError as exc:
                    raise EstimatorError(str(exc)) from None

            if run_m is not None:
                requests: list[Any] | None = run_m.workload
            elif o.workload is not None:
                requests = read_workload(o.workload, allow_trace=True)
            elif o.rate is not None:
                requests = make(o.rate)
            else:
                requests = None
        except WorkloadError as exc:
            raise EstimatorError(str(exc)) from None
        return cls(eng, configs, requests, make, run_m)


def simulate_workload(sim: Callable[..., tuple[Any, Any]], cfg: dict[str, Any], arrivals: Arrivals,
                      o: SimulateOptions, suffix: str) -> dict[str, Any]:
    """One config on the arrivals: the summary printed (and the SLO attainment, and the comparison with a
    measured run); requests.csv (and cdf.png, paired.csv) written."""
    from estimator.sim import measured as meas
    from estimator.sim.workload import slo_attainment, summarize

    assert arrivals.requests is not None
    t0 = time.perf_counter()
    frame, run = sim(arrivals.requests, cfg)
    elapsed = time.perf_counter() - t0
    s = summarize(frame)
    entry: dict[str, Any] = {"summary": s, "simulate_s": elapsed, "iterations": run.iterations}
    typer.echo(
        f"[{_label(cfg)}] {len(frame)} requests, {run.iterations} iterations simulated in "
        f"{elapsed * 1e3:.0f} ms; throughput {s.get('throughput_rps', math.nan):.2f} req/s"
    )
    for m in ("queue_ms", "ttft_ms", "tpot_ms", "e2e_ms"):
        typer.echo(f"  {m:9s} " + "  ".join(f"{st} {_fmt(s[m][st])}" for st in ("mean", "p50", "p90", "p99")))
    if o.slo_ttft_ms is not None and o.slo_tpot_ms is not None:
        entry["slo_attainment"] = slo_attainment(frame, o.slo_ttft_ms, o.slo_tpot_ms)
        typer.echo(
            f"  SLO attainment (TTFT <= {o.slo_ttft_ms:g} ms and TPOT <= {o.slo_tpot_ms:g} ms): "
            f"{entry['slo_attainment'] * 100:.1f}%"
        )
    run_m = arrivals.measured
    if run_m is not None:
        pairs = meas.paired(frame, run_m.requests)
        cmp = meas.compare(pairs)
        entry["comparison"] = cmp
        typer.echo(f"  against {run_m.kind} {run_m.path.name} ({cmp['requests']} requests), "
                   "error of the statistic, % [95% interval]:")
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
        if o.out is not None:
            meas.cdf_plot(pairs, o.out / "cdf.png", f"{run_m.path.name}: simulated vs measured")
            pairs.reset_index().to_csv(o.out / "paired.csv", index=False)
    if o.out is not None:
        frame.assign(token_times_ms=frame["token_times_ms"].map(json.dumps)).to_csv(
            o.out / f"requests{suffix}.csv", index=False
        )
    return entry


def rate_curve(sim: Callable[..., tuple[Any, Any]], cfg: dict[str, Any], arrivals: Arrivals, o: SimulateOptions,
               suffix: str) -> dict[str, Any]:
    """--rates: latency against the arrival rate for one config, printed; the goodput with the SLOs
    (contract/slo.py); curve.csv written."""
    from contract.slo import goodput
    from estimator.sim.workload import capacity_curve

    try:
        values = [float(x) for x in (o.rates or "").split(",") if x.strip()]
    except ValueError:
        raise EstimatorError(f"--rates {o.rates!r}: expected comma-separated numbers") from None
    if not values or min(values) <= 0:
        raise EstimatorError("--rates: give positive rates")
    t0 = time.perf_counter()
    curve = capacity_curve(values, arrivals.make,
                           lambda reqs: sim(reqs, cfg)[0],
                           o.slo_ttft_ms, o.slo_tpot_ms)
    entry: dict[str, Any] = {"curve": curve.to_dict(orient="records"), "curve_s": time.perf_counter() - t0}
    typer.echo(f"[{_label(cfg)}] latency vs rate ({o.count} requests per rate, {entry['curve_s']:.2f} s):")
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
    if o.out is not None:
        curve.to_csv(o.out / f"curve{suffix}.csv", index=False)
    return entry


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(type(v).__name__)
