"""`estimate calibrate MODEL RUN --load i --out CAL`: the running server's level and front-end costs, fitted on one
window of one served load; `estimate calibrate MODEL RUN --steps`: the serving software's per-iteration term, fitted
once on several loads of one start, into MODEL/serving.json (estimator/sim/calibrate.py). Registered on the
`estimate` app by estimator/cli/app.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from estimator.cli.common import run_command


def calibrate(
    model_dir: Annotated[Path, typer.Argument(help="An iteration model folder (estimate train --target iteration)")],
    run: Annotated[Path, typer.Argument(help="A profile serve-bench run of the server to calibrate on.")],
    out: Annotated[Path | None, typer.Option(help="Folder that receives calibration.json.")] = None,
    load: Annotated[int | None, typer.Option(help="Which load of the run (needed where it served several).")] = None,
    start_s: Annotated[float, typer.Option(help="The window's start on the load's clock (s).")] = 0.0,
    window_s: Annotated[
        float | None, typer.Option(help="The window's span of arrivals (s); at least 30. Default: the whole load.")
    ] = None,
    steps: Annotated[
        bool,
        typer.Option(
            "--steps",
            help="Instead: fit the serving software's per-iteration term on every load of RUN (at least 2, at "
            "different rates) and write MODEL/serving.json, which later calibrations copy.",
        ),
    ] = False,
) -> None:
    """Fit this server start's level (a ratio to the iteration model, with MODEL/serving.json's per-step terms)
    and the front end's costs per request and per token on one observed window; `estimate simulate MODEL
    --calibration CAL` then predicts new traffic."""
    from estimator.errors import EstimatorError
    from estimator.model.iteration import IterationEstimator
    from estimator.sim.calibrate import calibrate as fit
    from estimator.sim.measured import load_measured

    def go() -> None:
        model = IterationEstimator.load(model_dir)
        if steps:
            fit_serving_steps(model, model_dir, run)
            return
        if out is None:
            raise EstimatorError("give --out CAL (the folder that receives calibration.json), or --steps")
        measured = load_measured(run, load=load)
        t0 = time.perf_counter()
        cal = fit(model, model_dir, measured, start_s=start_s, span_s=window_s)
        path = cal.save(out)
        f = cal.fit
        typer.echo(
            f"calibrated on {measured.label} ({cal.requests} requests over {cal.window_s:.1f} s) in "
            f"{time.perf_counter() - t0:.1f} s: level {cal.level:.3f} x the iteration model (per-step terms "
            f"{cal.iteration_ms:.3f} ms per iteration, {cal.sequence_ms:.3f} ms per sequence), front end "
            f"{cal.frontend_request_ms:.2f} ms per request and {cal.frontend_token_ms:.3f} ms per token; on the window "
            f"TTFT MAPE {f['ttft_mape_pct']:.1f}%, E2E MAPE {f['e2e_mape_pct']:.1f}%, mean TTFT "
            f"{f['ttft_mean_error_pct']:+.1f}%, mean E2E {f['e2e_mean_error_pct']:+.1f}%; wrote {path}"
        )

    run_command(go)


def fit_serving_steps(model: Any, model_dir: Path, run: Path) -> None:
    """--steps: the per-iteration term on every load of `run`, saved as MODEL/serving.json."""
    from estimator.data.runs import run_loads
    from estimator.sim.calibrate import fit_steps
    from estimator.sim.measured import load_measured

    loads = [load_measured(run, load=i) for i in run_loads(run)]
    t0 = time.perf_counter()
    found = fit_steps(model, model_dir, loads)
    path = found.save(model_dir)
    fit = found.fit or {}
    typer.echo(
        f"per-iteration term fitted on {len(loads)} loads of {run.name} in {time.perf_counter() - t0:.1f} s: "
        f"{found.iteration_ms:.3f} ms; one level per load then: "
        + ", ".join(f"{lv:.3f}" for lv in fit.get("levels", []))
        + f"; wrote {path}"
    )
