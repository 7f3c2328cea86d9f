"""`estimate experiment ...`: the estimator's published experiments, thin commands over estimator/study.

- `scheduler DIR`: the scheduler experiment's statistics from the rows `profile experiment scheduler` wrote
  (`--set-slo` fixes its SLOs before any policy runs; `--regoodput FILE` recomputes a results file's goodput
  from its stored rows);
- `simulate-validate MODEL RUN...`: the simulator against measured replay and serve-bench runs;
- `calibration MODEL RUN...`: calibrate on one load of each server start, predict its other loads (one-time and
  followed), against the server's own floor, its histograms and over time (estimator/study/calibration.py);
- `simulate-speed MODEL ENGINE_RUN`: 10,000 requests and an 8-rate curve through the replica;
- `estimator-speed MODEL`: the compiled tables against the booster and a bare searchsorted;
- `decision-speed DIR`: one arrival decision of `estimate` and `estimate-admit` on a scheduler experiment's mix;
- `estimator-variants RUN...`: each feature variant's training, prediction cost and held-out MAPE;
- `budget-accuracy ADAPTIVE FULL HELDOUT...`: the budgeted default's model against the full grid's on a held-out
  run (estimator/study/budget_accuracy.py);
- `serve-accuracy MODEL RUN`: `estimate serve`'s llm-d answers against llm-d's XGBoost recipe on one serve-bench
  run's requests (estimator/study/serve_accuracy.py);
- `nightly-detection`: interleaved nights with an injected engine slowdown, detection and false-alarm rates
  (estimator/study/nightly_detection.py; it measures, for hours: run it alone).
Speed figures are printed, never asserted: run them alone on the machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from estimator.cli.common import run_command
from estimator.errors import EstimatorError

experiment = typer.Typer(
    help="The estimator's published experiments (figures to print; run them alone on the machine).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _print_table(title: str, columns: list[str], rows: list[tuple[str, ...]]) -> None:
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)


@experiment.command()
def scheduler(
    folder: Annotated[Path, typer.Argument(help="The experiment's folder (profile experiment scheduler --out).")],
    set_slo: Annotated[bool, typer.Option("--set-slo", help="Fix the SLOs in setup.json (before any policy ran).")]
    = False,
    slo_scale: Annotated[float | None, typer.Option(help="SLO = K x the class's median alone (default: the rule).")]
    = None,
    regoodput: Annotated[bool, typer.Option("--regoodput", help="FOLDER is a results JSON: recompute its goodput "
                                                                "from its stored rows and rewrite it.")] = False,
) -> None:
    """The scheduler experiment's statistics (results.json, attainment.png) from its raw rows."""
    from estimator.report.sections.scheduling import ANCHORS, attainment_figure
    from estimator.study import scheduling

    def go() -> None:
        if regoodput:
            result, lines = scheduling.regoodput(json.loads(folder.read_text()))
            typer.echo("\n".join(lines))
            folder.write_text(json.dumps(result, indent=1, default=float))
            typer.echo(f"wrote {folder}")
            return
        if set_slo:
            setup = scheduling.set_slo(folder, slo_scale)
            typer.echo(f"SLO scale {setup['slo_scale']:g} ({setup['slo_scale_rule']})")
            return
        result, lines = scheduling.analyze(folder, slo_scale)
        typer.echo("\n".join(lines))
        result["anchors"] = [list(a) for a in ANCHORS]
        tag = f"-x{slo_scale:g}" if slo_scale else ""
        (folder / f"results{tag}.json").write_text(json.dumps(result, indent=1, default=float))
        (folder / f"attainment{tag}.png").write_bytes(attainment_figure(result["rows"],
                                                                        result["setup"]["capacity_rps"]))
        typer.echo(f"wrote {folder / f'results{tag}.json'} and {folder / f'attainment{tag}.png'}")

    run_command(go)


@experiment.command("simulate-validate")
def simulate_validate(
    model: Annotated[Path, typer.Argument(help="Iteration model folder (with its serving.json).")],
    runs: Annotated[list[Path], typer.Argument(help="Measured replay or serve-bench runs.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the rows here (estimate report "
                                                                  "--simulation reads them).")] = None,
    plots: Annotated[Path | None, typer.Option(help="Folder for CDF plots, one per workload kind.")] = None,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Replays: scale the iteration model by each run's "
                                                                "own engine-start speed (an oracle).")] = False,
    load: Annotated[int | None, typer.Option(help="Which load of serve-bench runs of several [default: each].")]
    = None,
) -> None:
    """The simulator against measured runs: E2E and TTFT MAPE, errors of mean/p50/p90/p99 with 95% intervals."""
    from estimator.sim.measured import cdf_plot
    from estimator.sim.validation import ci_text, save_validation, validate_simulation

    def go() -> None:
        result, pooled = validate_simulation(model, runs, calibrate=calibrate, load=load)
        o = result.overheads
        typer.echo(f"overheads: per iteration {o['iteration_ms']:.3f} ms, per sequence {o['sequence_ms']:.3f} ms, "
                   f"per request {o['request_ms']:.2f} ms (fitted on {o['fitted_on'] or 'nothing'})")
        typer.echo("run | source | n | E2E MAPE | E2E mean | E2E p90 | E2E p99 | TTFT MAPE | TTFT mean | TTFT p90 | "
                   "TPOT mean | SLO met measured / simulated | targets")
        for r in result.rows:
            typer.echo(
                f"{r.name} | {r.source} | {r.requests} | {r.e2e_mape.value:.1f} | {ci_text(r.e2e['mean'])} | "
                f"{ci_text(r.e2e['p90'])} | {ci_text(r.e2e['p99'])} | {r.ttft_mape.value:.1f} | "
                f"{ci_text(r.ttft['mean'])} | {ci_text(r.ttft['p90'])} | {ci_text(r.tpot['mean'])} | "
                f"{r.slo_measured_pct:.0f}% / {r.slo_simulated_pct:.0f}% | "
                f"{'met' if r.meets_targets() else 'missed'}")
        if json_out is not None:
            save_validation(result, json_out)
            typer.echo(f"wrote {json_out}")
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
            for key, pairs in pooled.items():
                cdf_plot(pairs, plots / f"cdf-{key.replace(':', '-')}.png", f"{key}: simulated vs measured")
            typer.echo(f"wrote {plots}")

    run_command(go)


@experiment.command("calibration")
def calibration(
    model: Annotated[Path, typer.Argument(help="Iteration model folder (estimate train --target iteration).")],
    runs: Annotated[list[Path], typer.Argument(help="serve-bench runs of several loads, one per server start.")],
    calibrate_on: Annotated[str, typer.Option(help="The calibration load's workload file stem.")] = "cal",
    follow_s: Annotated[float, typer.Option(help="Following: re-fit the level on the last S s of the load "
                                                  "before.")] = 30.0,
    slo_ttft_ms: Annotated[float | None, typer.Option(help="TTFT SLO (ms) for goodput.")] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="TPOT SLO (ms) for goodput.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the study here (estimate report "
                                                                  "--calibration reads it).")] = None,
    plots: Annotated[Path | None, typer.Option(help="Folder for the drift plot, one per start.")] = None,
) -> None:
    """Calibrate on one load per server start and predict the loads it never saw: errors against targets and the
    server's own floor, the mechanisms against its histograms, drift, and following the level."""
    from estimator.model.iteration import IterationEstimator
    from estimator.study import calibration as study

    def go() -> None:
        if (slo_ttft_ms is None) != (slo_tpot_ms is None):
            raise EstimatorError("give both --slo-ttft-ms and --slo-tpot-ms, or neither")
        est = IterationEstimator.load(model)
        slo = (slo_ttft_ms, slo_tpot_ms) if slo_ttft_ms is not None and slo_tpot_ms is not None else None
        starts = []
        for run in runs:
            s = study.study_start(est, model, run, calibrate_on, follow_s, slo)
            starts.append(s)
            cal = s["calibration"]
            typer.echo(f"{run.name}: calibrated on load {s['calibrated_on']} (level {cal['level']:.3f}, front end "
                       f"{cal['frontend_request_ms']:.2f} ms/request, {cal['frontend_token_ms']:.3f} ms/token)")
            for line in study.start_lines(s):
                typer.echo("  " + line)
            if plots is not None:
                typer.echo(f"  wrote {study.drift_plot(s, plots / f'drift-{run.name}.png')}")
        ways = ("one_time", "followed", "live", "oracle")
        across = {w: study.across_starts(starts, w) for w in ways}
        result = {"model": str(model), "calibrate_on": calibrate_on, "follow_s": follow_s, "starts": starts,
                  "verdicts": {w: [study.verdict(s, w) for s in starts] for w in ways},
                  "across_starts": across, "targets": study.TARGETS}
        for w, figures in across.items():
            typer.echo(f"across {len(starts)} start(s), {w.replace('_', '-')}: mean |error| % [95% t interval]: "
                       + ", ".join(f"{k} {v['mean_abs_error_pct']:.1f} [{v['lo']:.1f}, {v['hi']:.1f}]"
                                   for k, v in figures.items()))
        if json_out is not None:
            typer.echo(f"wrote {study.save(result, json_out)}")

    run_command(go)


@experiment.command("simulate-speed")
def simulate_speed(
    model: Annotated[Path, typer.Argument(help="Iteration model folder.")],
    engine: Annotated[Path, typer.Argument(help="A run whose manifest records the engine's limits.")],
    count: Annotated[int, typer.Option(help="Requests to simulate.")] = 10_000,
    rate: Annotated[float, typer.Option(help="Arrival rate, requests per second.")] = 8.0,
) -> None:
    """Seconds to simulate COUNT requests (one thread) and an 8-rate capacity curve of 1,000 requests each."""
    from estimator.study.speed import simulate_speed as measure

    run_command(lambda: typer.echo("\n".join(measure(model, engine, count, rate))))


@experiment.command("estimator-speed")
def estimator_speed(
    model: Annotated[Path, typer.Argument(help="Model folder (estimate train) with compiled tables.")],
    calls: Annotated[int, typer.Option(help="Calls per timing (each with new arguments).")] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the random lengths.")] = 0,
) -> None:
    """The compiled tables against the booster and a bare searchsorted: cost per call and agreement."""
    from estimator.study.speed import table_costs

    run_command(lambda: _print_table(f"Compiled tables vs the LightGBM booster: {model}",
                                     ["figure", "tables", "booster"], table_costs(model, calls, seed)))


@experiment.command("decision-speed")
def decision_speed(
    folder: Annotated[Path, typer.Argument(help="A scheduler experiment folder (profile experiment scheduler --out).")],
    decisions: Annotated[int, typer.Option(help="Decisions timed per policy and engine state.")] = 360,
    recompute_lengths: Annotated[bool, typer.Option("--recompute-lengths", help="Drop the output-length predictions "
                                                    "before every decision (the cost without them kept).")] = False,
) -> None:
    """p50 and p99 of one arrival decision (µs) of estimate and estimate-admit, with 4, 8 and 16 requests held."""
    from estimator.study.speed import decision_speed as measure

    title = f"One arrival decision, µs: {folder}" + (" (output lengths recomputed)" if recompute_lengths else "")
    run_command(lambda: _print_table(title, ["policy", "held", "p50 µs", "p99 µs"],
                                     measure(folder, decisions=decisions, recompute_lengths=recompute_lengths)))


@experiment.command("estimator-variants")
def estimator_variants(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    variant: Annotated[list[str] | None, typer.Option(help="Variants to bench (repeatable) [default: all].")] = None,
    calls: Annotated[int, typer.Option(help="Single-row calls per median.")] = 300,
) -> None:
    """Each variant on the given runs: training and load time, prediction cost, held-out MAPE beside the floor."""
    from estimator.study.speed import variant_costs

    def go() -> None:
        columns, rows, floor = variant_costs(runs, variant, calls, say=lambda m: typer.echo(m, err=True))
        _print_table("Estimator variants", columns, rows)
        typer.echo(floor)

    run_command(go)


@experiment.command("budget-accuracy")
def budget_accuracy(
    adaptive_model: Annotated[Path, typer.Argument(help="The budgeted default sweep's tokens model.")],
    full_model: Annotated[Path, typer.Argument(help="The full grid's tokens model (profile sweep --study full-grid).")],
    heldout: Annotated[list[Path], typer.Argument(help="Held-out run folder(s), measured in their own engine starts.")],
    adaptive_compare: Annotated[
        Path | None, typer.Option(help="compare.json of `estimate compare` on the budgeted run (verdict side by side).")
    ] = None,
    full_compare: Annotated[
        Path | None, typer.Option(help="compare.json of `estimate compare` on the full grid.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
) -> None:
    """Held-out MAPE of the budgeted default's model against the full grid's: ratio with its paired interval."""
    from estimator.study.budget_accuracy import compare_on_heldout, verdict_readings

    def go() -> None:
        result = compare_on_heldout(adaptive_model, full_model, heldout)
        if adaptive_compare is not None and full_compare is not None:
            a, b = verdict_readings(adaptive_compare), verdict_readings(full_compare)
            result["verdict"] = {"adaptive": a, "full": b, "unchanged": a == b}

        def table(title: str, by_phase: dict[str, Any]) -> None:
            rows: list[tuple[str, ...]] = [(k, f"{v['adaptive_mape']:.2f}", f"{v['full_mape']:.2f}",
                     f"{v['ratio']:.3f} [{v['ratio_ci'][0]:.3f}, {v['ratio_ci'][1]:.3f}]", str(v["prompts"]))
                    for k, v in by_phase.items()]
            _print_table(title, ["what", "budgeted %", "full %", "ratio [95% CI]", "prompts"], rows)

        table("Held-out MAPE: budgeted default vs full grid", result["by_phase"])
        shape = result["level_removed"]
        table(f"The same, each model's level removed per held-out engine start ({shape['starts']} starts)",
              shape["by_phase"])
        if "verdict" in result:
            typer.echo(f"verdict unchanged: {result['verdict']['unchanged']} "
                       f"(budgeted {result['verdict']['adaptive']}; full {result['verdict']['full']})")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
            typer.echo(f"wrote {out}")

    run_command(go)


@experiment.command("serve-accuracy")
def serve_accuracy(
    model: Annotated[Path, typer.Argument(help="Iteration model folder (what estimate serve serves).")],
    run: Annotated[Path, typer.Argument(help="A profile serve-bench run of at least 2 loads (its /metrics scrapes).")],
    lengths: Annotated[Path | None, typer.Option(help="Output-length trace for the stand-in requests.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results JSON here.")] = None,
) -> None:
    """estimate serve's llm-d answers against llm-d's own recipe (XGBoost on its features) on the same live-server
    requests, two-fold by load: pinball loss at p90 and MAPE of the means, with intervals."""
    from estimator.serve.predictor import load_predictor
    from estimator.study.serve_accuracy import serve_accuracy as compare

    def go() -> None:
        try:
            import xgboost  # noqa: F401 - llm-d's model
        except ImportError:
            raise EstimatorError("serve-accuracy needs xgboost: pip install -e '.[serve-study]'") from None
        result = compare(load_predictor(model, engine=run, lengths=lengths), run)
        rows = []
        for target, s in result["scores"].items():
            for metric in ("pinball_p90_ms", "mape_mean_pct"):
                cells = [f"{s[metric][k]['value']:.3f} [{s[metric][k]['lo']:.3f}, {s[metric][k]['hi']:.3f}]"
                         for k in ("llmd_xgboost", "ours", "ours_minus_llmd")]
                rows.append((f"{target} {metric}", *cells))
            rows.append((f"{target} p90 coverage", f"{s['coverage_p90']['llmd_xgboost']:.3f}",
                         f"{s['coverage_p90']['ours']:.3f}", ""))
        _print_table(f"estimate serve vs llm-d's XGBoost recipe: {result['requests']} requests, loads "
                     f"{result['loads']}, two-fold by load", ["figure", "llm-d XGBoost", "ours", "ours - llm-d"], rows)
        if out is not None:
            out.write_text(json.dumps(result, indent=1) + "\n")
            typer.echo(f"wrote {out}")

    run_command(go)


@experiment.command("nightly-detection")
def nightly_detection(
    nights: Annotated[
        int, typer.Option(min=0, help="nights to run now (it resumes from its folder; 0: only recompute the figures)")
    ] = 1,
    out: Annotated[Path, typer.Option(help="study folder: nights.jsonl (resume state) and detection.json")] = Path(
        "docs/nightly-detection"
    ),
    runs_dir: Annotated[Path, typer.Option(help="where the sweeps' run folders go")] = Path(
        "results/nightly-detection"
    ),
    spec: Annotated[Path, typer.Option(help="the sweep spec of both sides")] = Path("scripts/nightly_study_spec.toml"),
    rounds: Annotated[int, typer.Option(min=1, help="interleaved rounds per night (2 sweeps each)")] = 2,
    tolerance: Annotated[float, typer.Option(min=0.0, max=0.5, help="flag ratios above 1 + this")] = 0.05,
    seed: int = 0,
) -> None:
    """The nightly's detection study: interleaved nights with an injected engine slowdown of 5/10/20% (or none),
    until 20 unchanged and 10 injected nights per size are measured; detection and false-alarm rates with
    Clopper-Pearson intervals (estimator/study/nightly_detection.py). Run it alone on the machine."""
    from estimator.study.nightly_detection import DetectionSpec, run_study

    def go() -> None:
        result = run_study(
            DetectionSpec(out=out, runs_dir=runs_dir, spec=spec, nights=nights, rounds=rounds, tolerance=tolerance,
                          seed=seed),
            lambda m: typer.echo(m, err=True),
        )
        def cell(d: dict[str, Any]) -> str:
            return f"{d['k']}/{d['n']}" + (f" {d['rate']:.2f} [{d['lo']:.2f}, {d['hi']:.2f}]" if d["n"] else "")

        rows = []
        for title, rates in (("raw", result), ("canary-normalized", result["normalized"])):
            sizes = [cell(rates["detection_rate"].get(s) or {"n": 0, "k": 0}) for s in ("5", "10", "20")]
            rows.append((title, cell(rates["false_alarm_rate"]), *sizes))
        _print_table(f"nightly detection: nights {result['pairs']}", ["rule", "false alarms", "5%", "10%", "20%"],
                     rows)
        for c in result["canary"]["per_config"]:
            typer.echo(f"canary: {c['label']} {c['phase']}: sweep-to-sweep log sd {c['raw_log_sd']} raw, "
                       f"{c['normalized_log_sd']} normalized (removed {c['removed']} {c['removed_ci']})")
        need = result.get("rounds_needed") or {}
        for key, r in (need.get("per_config") or {}).items():
            typer.echo(f"rounds for {need['detection']:.0%} detection of {need['effect']:.0%} at "
                       f"{need['false_alarm']:.0%} false alarms: {key}: {r['rounds']} {r['rounds_ci']} "
                       f"(round log sd {r['round_log_sd']})")
        typer.echo(f"wrote {out / 'detection.json'} and {out / 'detection.png'}")

    run_command(go)
