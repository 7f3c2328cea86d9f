"""`estimate report` and `estimate nightly`: thin typer commands over `estimator.report` and `estimator.nightly`.

Plain functions with typer defaults, registered on the `estimate` app in `estimator.cli`
(`app.command()(report)`, `app.command()(nightly)`).
Bad input (EstimatorError, spec validation) prints one line on stderr and exits with code 2, as the other
`estimate` commands do.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel

from estimator.cli.common import build_spec, run_command

EXIT_JOB_FAILED = 4  # nightly: an unexpected error (0 ok, 1 regression, 2 bad input, 3 sweep failed)
S = TypeVar("S", bound=BaseModel)
T = TypeVar("T")


def report(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders (results/<run_id>), one or more.", show_default=False)
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.html, report.md and the figures (PNG).")],
    model: Annotated[
        Path | None, typer.Option(help="Model folder (estimate train) to score and explain (default: none).")
    ] = None,
    history: Annotated[Path | None, typer.Option(help="Nightly history.jsonl: adds the trend over nights.")] = None,
    nightly_summary: Annotated[
        Path | None, typer.Option(help="A nightly summary JSON: adds tonight's regression table.")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Page title (default: 'Latency report: RUN...').")] = None,
    batch: Annotated[
        list[Path] | None,
        typer.Option(help="Batch run (repeatable) whose `estimate batch` / `estimate validate` outputs add the "
                     "batch-level section."),
    ] = None,
    simulation: Annotated[
        Path | None,
        typer.Option(help="A simulation validation JSON (estimate experiment simulate-validate --json): adds the "
                     "workload-simulation section."),
    ] = None,
    scheduler: Annotated[
        Path | None,
        typer.Option(help="The scheduler experiment's results.json (profile experiment scheduler): adds the "
                     "scheduling section (goodput per policy on the real engine, attainment against rate)."),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(help="The calibration study's JSON (estimate experiment calibration --json): adds the section "
                     "on predicting a live server from one calibrated window (drift-*.png beside it are shown)."),
    ] = None,
) -> None:
    """Write a self-contained HTML report (figures inlined) and its Markdown twin for one or more runs."""
    from estimator.report.build import ReportSpec, write_report

    def go() -> None:
        spec = build_spec(
            ReportSpec,
            runs=runs,
            out=out,
            model=model,
            history=history,
            nightly_summary=nightly_summary,
            title=title,
            batch=list(batch or []),
            simulation=simulation,
            scheduler=scheduler,
            calibration=calibration,
        )
        files = write_report(spec, progress=lambda msg: typer.echo(f"  {msg}", err=True))
        typer.echo(f"wrote {files.html} (self-contained) and {files.markdown} (+{len(files.images)} PNG files)")

    run_command(go)


def nightly(
    spec: Annotated[Path, typer.Option(help="Sweep spec (TOML/YAML) the nightly runs.")] = Path(
        "scripts/nightly_spec.toml"
    ),
    state_dir: Annotated[
        Path, typer.Option(help="Where runs, models, reports, baseline.json and history.jsonl live.")
    ] = Path("nightly"),
    baseline: Annotated[
        Path | None, typer.Option(help="Compare with this run folder instead of the accepted baseline.")
    ] = None,
    accept: Annotated[bool, typer.Option(help="Promote tonight's run to baseline.")] = False,
    run: Annotated[Path | None, typer.Option(help="Check this finished run folder instead of sweeping.")] = None,
    profile: Annotated[
        str | None, typer.Option(help="Command that runs the harness CLI (default: the venv's `profile`).")
    ] = None,
    profile_arg: Annotated[
        list[str] | None,
        typer.Option(help="Extra `profile sweep` argument, repeatable (e.g. --profile-arg=--gpu --profile-arg=0)."),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Flag when the 95% CI of tonight/baseline lies above 1 + this.")
    ] = 0.05,
    mape_growth: Annotated[
        float, typer.Option(help="Flag held-out MAPE growing by more than this fraction (and > 1 point).")
    ] = 0.25,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the CI.")] = 2000,
    control_k: Annotated[
        float, typer.Option(help="Flag only beyond the accepted nights' centre × exp(k · their spread).")
    ] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed for the bootstrap and training.")] = 0,
    confirm: Annotated[
        bool, typer.Option(help="When a config is flagged, sweep once more; keep only the flags it repeats.")
    ] = True,
    compare: Annotated[
        bool, typer.Option(help="Also run `estimate compare` on tonight's run (adds Experiment 2 to the report).")
    ] = False,
    make_report: Annotated[bool, typer.Option("--report/--no-report", help="Write the HTML report.")] = True,
    interleave: Annotated[
        int,
        typer.Option(
            min=0,
            max=20,
            help="Rounds of an interleaved night: the accepted settings and tonight's alternate in random order, "
            "each a fresh engine start with the CPU canary, and the paired rounds decide (0: one sweep).",
        ),
    ] = 0,
) -> None:
    """Nightly regression job: sweep, train, compare with the baseline (exit 1 regression, 3 sweep failed, 4 crash)."""
    from estimator.nightly.job import format_result, run_nightly
    from estimator.nightly.spec import NightlySpec

    def go() -> int:
        nspec = build_spec(
            NightlySpec,
            spec=spec,
            state_dir=state_dir,
            baseline=baseline,
            accept=accept,
            run=run,
            profile=profile,
            profile_args=list(profile_arg or []),
            tolerance=tolerance,
            mape_growth=mape_growth,
            bootstrap=bootstrap,
            control_k=control_k,
            seed=seed,
            confirm=confirm,
            compare=compare,
            report=make_report,
            interleave=interleave,
        )
        result = run_nightly(nspec, progress=lambda msg: typer.echo(f"[nightly] {msg}", err=True))
        for line in format_result(result):
            typer.echo(line)
        return result.exit_code

    try:
        code = run_command(go)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception:  # a crash of the job itself must not read as a latency regression (exit 1) in cron
        traceback.print_exc()
        typer.echo(f"error: the nightly job itself failed (exit {EXIT_JOB_FAILED})", err=True)
        raise typer.Exit(code=EXIT_JOB_FAILED) from None
    if code:
        raise typer.Exit(code=code)
