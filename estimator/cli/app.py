"""The `estimate` command: thin typer commands over the estimator library.

Each command parses flags, builds one validated spec, calls one library function and prints. Problems with the
input (EstimatorError, spec validation) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from estimator.cli.calibrate import calibrate
from estimator.cli.common import build_spec, run_command
from estimator.cli.experiment import experiment
from estimator.cli.extra import nightly, report
from estimator.cli.serve import serve
from estimator.cli.simulate import simulate
from estimator.errors import EstimatorError

app = typer.Typer(
    name="estimate",
    help="Learn and evaluate a latency estimator from harness runs (results schema v1).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: a "[default: ...]" or "[engine]" in it is printed, not parsed
)


RunsArg = Annotated[list[Path], typer.Argument(help="Run folders (results/<run_id>), one or more.", show_default=False)]


def _console() -> Console:
    return Console(width=160) if not Console().is_terminal else Console()


@app.command()
def analyze(
    runs: RunsArg,
    out: Annotated[Path | None, typer.Option(help="Output folder [default: <first run>/analysis].")] = None,
) -> None:
    """Experiment 1: latency CV across different prompts vs repeats of one prompt, per config and length."""
    from estimator.data.runs import load_runs
    from estimator.study.analyze import AnalyzeSpec, analyze_runs, print_analysis, write_analysis

    def go() -> None:
        spec = build_spec(AnalyzeSpec, runs=runs, out=out)
        result = analyze_runs(load_runs(spec.runs))
        write_analysis(result, spec.out_dir())
        print_analysis(result, _console())

    run_command(go)


@app.command()
def train(
    runs: RunsArg,
    out: Annotated[Path, typer.Option(help="Model folder to write (e.g. models/NAME).")],
    variant: Annotated[str, typer.Option(help="tokens | buckets | poly | embedding | residual | blocks.")] = "tokens",
    seed: Annotated[int, typer.Option(help="Seed for the split, subsampling and LightGBM.")] = 0,
    max_decode_rows: Annotated[int, typer.Option(help="Subsample decode rows to at most this many.")] = 20_000,
    held_out: Annotated[bool, typer.Option(help="Also fit on a by-prompt split to record held-out metrics.")] = True,
    numeric_axis: Annotated[
        list[str] | None,
        typer.Option(
            help="Config axis that may be interpolated inside its trained range (repeatable); "
            "other axes accept only their trained values."
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="request: prefill + per-position decode (batch size 1, the default); iteration: one "
            "engine iteration under continuous batching, from its composition (batch runs: iterations/)."
        ),
    ] = "request",
) -> None:
    """Fit one LightGBM model per phase and save it (LightGBM text models + meta.json, no pickle)."""
    from estimator.model.train import TrainSpec
    from estimator.model.train import train as train_model

    def go() -> None:
        if target not in ("request", "iteration"):
            raise EstimatorError(f"--target must be request or iteration, got {target!r}")
        if target == "iteration":
            _train_iterations(runs, out, seed)
            return
        spec = build_spec(
            TrainSpec,
            runs=runs,
            out=out,
            variant=variant,
            seed=seed,
            max_decode_rows=max_decode_rows,
            held_out=held_out,
            numeric_axes=list(numeric_axis or []),
        )
        result = train_model(spec)
        console = _console()
        meta = result.meta
        console.print(
            f"trained [bold]{meta.variant}[/bold] on {meta.training.rows['prefill']} prefill + "
            f"{meta.training.rows['decode']} decode rows ({len(meta.training.configs)} configs, text_tokens "
            f"{meta.training.text_tokens_min}..{meta.training.text_tokens_max}) in {result.train_s:.1f} s"
        )
        if meta.held_out:
            for phase, m in meta.held_out.metrics.items():
                console.print(
                    f"  held out ({meta.held_out.description}) {phase}: R² {_fmt(m.get('r2'), 3)}, "
                    f"MAE {_fmt(m.get('mae_ms'), 3)} ms, MAPE {_fmt(m.get('mape_pct'))}%, "
                    f"p90 APE {_fmt(m.get('p90_ape_pct'))}%"
                )
        console.print(f"wrote {result.path}")

    run_command(go)


def _train_iterations(runs: list[Path], out: Path, seed: int) -> None:
    from estimator.model.iteration import train_iteration_estimator

    result = train_iteration_estimator(runs, out, seed=seed)
    meta = result.estimator.meta
    held = f"{result.held_out_mape_pct:.2f}%" if result.held_out_mape_pct is not None else "– (fewer than 4 segments)"
    typer.echo(
        f"trained the iteration model on {meta.rows} iterations of {', '.join(meta.runs)} "
        f"({len(meta.configs)} configs); held-out MAPE (by segment) {held}"
    )
    for fit in meta.configs:
        a, b, c, d, e, f = fit.coef_ms
        cfg = ", ".join(f"{k}={v}" for k, v in fit.config.items())
        typer.echo(
            f"  {cfg}: {a:.3g} + {b:.3g}·prefill_tokens + {c:.3g}·Σlen² + {d:.3g}·decode_seqs + "
            f"{e:.3g}·Σctx + {f:.3g}·decodes·(max−mean ctx) ms ({fit.rows} iterations)"
        )
    typer.echo(f"wrote {result.path / 'iteration.json'}")


@app.command()
def compare(
    ctx: typer.Context,
    runs: RunsArg,
    out: Annotated[Path | None, typer.Option(help="Output folder [default: <first run>/compare].")] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Variants to compare (repeatable) [default: all six: tokens, buckets, poly, embedding, "
                     "residual, blocks]."),
    ] = None,
    references: Annotated[bool, typer.Option(help="Also fit the closed-form and random-forest references.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for the by-prompt split, subsampling and the models.")] = 0,
    max_decode_rows: Annotated[int, typer.Option(help="Subsample decode training rows to at most this many.")] = 20_000,
    cost_calls: Annotated[int, typer.Option(help="Single-row calls timed per model (median).")] = 200,
    repeated: Annotated[
        bool, typer.Option(help="Repeated grouped folds with 95% intervals (learners × variants, three questions).")
    ] = True,
    folds: Annotated[int, typer.Option(help="Folds grouped by prompt, per seed.")] = 5,
    seeds: Annotated[int, typer.Option(help="Seeds the by-prompt folds are repeated over.")] = 3,
    learner: Annotated[
        list[str] | None, typer.Option(help="lightgbm | ridge | spline (repeatable) [default: all three].")
    ] = None,
    repeated_decode_rows: Annotated[
        int, typer.Option(help="Decode training rows per fold (subsampled) in the repeated folds.")
    ] = 2000,
    quick: Annotated[
        bool,
        typer.Option(help="What decides the verdict, in about a minute on 2 cores (the main job's default): the "
                     "product's learner (LightGBM) × every variant, one seed of folds, no reference models, "
                     "20 timed calls per model. Flags given beside it still apply."),
    ] = False,
) -> None:
    """Experiment 2: feature variants × learners vs references, repeated folds with 95% intervals; verdict."""
    from estimator.study.compare import CompareSpec, print_comparison, run_compare, write_comparison

    def go() -> None:
        values: dict[str, Any] = {
            "runs": runs,
            "out": out,
            "references": references,
            "seed": seed,
            "max_decode_rows": max_decode_rows,
            "cost_calls": cost_calls,
            "repeated": repeated,
            "folds": folds,
            "seeds": seeds,
            "repeated_decode_rows": repeated_decode_rows,
        }
        if quick:  # the full comparison's defaults, cut to what the verdict reads; explicit flags win below
            # by name: typer vendors its own click, whose ParameterSource is not click's
            given = {k for k in QUICK_COMPARE if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
            values.update({k: v for k, v in QUICK_COMPARE.items() if k not in given})
            values["learners"] = learner or ["lightgbm"]
        if variant:
            values["variants"] = variant
        if learner:
            values["learners"] = learner
        spec = build_spec(CompareSpec, **values)
        console = _console()
        result = run_compare(spec, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
        write_comparison(result, spec.out_dir())
        print_comparison(result, console)

    run_command(go)


QUICK_COMPARE = {"seeds": 1, "references": False, "cost_calls": 20}  # --quick's values; flags given beside it win


def _axis_value(text: str) -> int | float | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}"


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="Model folder written by `estimate train`.")],
    text_tokens: Annotated[int, typer.Option(help="Prompt length in tokens.")],
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate (prefill emits the first).")],
    tier: Annotated[int | None, typer.Option(help="Model tier.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sampling top_k (0 = off).")] = None,
    blocks: Annotated[int | None, typer.Option(help="KV-cache block size in tokens.")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="The dtype the engine computes in (float32, bfloat16); default: the one trained."),
    ] = None,
    axis: Annotated[list[str] | None, typer.Option(help="Other axis value, NAME=VALUE (repeatable).")] = None,
    text: Annotated[str | None, typer.Option(help="Prompt text (needed by the embedding variant).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    allow_unseen: Annotated[
        bool,
        typer.Option(
            help="Answer for axis values or lengths outside the training data (flagged as unseen) "
            "instead of refusing them."
        ),
    ] = False,
) -> None:
    """Predict prefill ms, decode ms per step (first/median/last) and whole-request ms for one request."""
    from contract.request import Request
    from estimator.model.predict import PredictSpec, predict_report

    def go() -> None:
        config: dict[str, Any] = {
            k: v for k, v in (("tier", tier), ("top_k", top_k), ("blocks", blocks), ("dtype", dtype)) if v is not None
        }
        for item in axis or []:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise EstimatorError(f"--axis needs NAME=VALUE, got {item!r}")
            config[name.strip()] = _axis_value(value.strip())
        spec = build_spec(
            PredictSpec,
            model=model,
            config=config,
            request=Request.make("predict", 0.0, text_tokens, new_tokens, prompt=text),
            allow_unseen=allow_unseen,
        )
        report = predict_report(spec)
        for w in report["warnings"]:
            typer.echo(f"warning: {w}", err=True)
        if report["unseen"]:
            typer.echo(f"UNSEEN (a best guess, --allow-unseen): {'; '.join(report['unseen'])}", err=True)
        if as_json:
            typer.echo(json.dumps(report, indent=1, default=str))
            return
        cfg = ", ".join(f"{k}={v}" for k, v in report["config"].items())
        typer.echo(f"model {report['model']} ({report['variant']}); {cfg}")
        typer.echo(f"prefill          {report['prefill_ms']:.3f} ms  ({report['text_tokens']} prompt tokens)")
        if report["decode_steps"]:
            typer.echo(
                f"decode per step  first {report['decode_first_ms']:.3f} ms, "
                f"median {report['decode_median_ms']:.3f} ms, "
                f"last {report['decode_last_ms']:.3f} ms  ({report['decode_steps']} steps)"
            )
        typer.echo(f"decode total     {report['decode_ms_total']:.3f} ms")
        typer.echo(f"request total    {report['total_ms']:.3f} ms")
        if report["unseen"]:
            typer.echo(f"unseen           {'; '.join(report['unseen'])}")

    run_command(go)


@app.command()
def batch(
    runs: RunsArg,
    out: Annotated[Path | None, typer.Option(help="Output folder [default: <first run>/batch].")] = None,
    folds: Annotated[int, typer.Option(help="Folds grouped by segment (replay or batch point).")] = 5,
    seeds: Annotated[int, typer.Option(help="Repeats of the fold assignment.")] = 3,
) -> None:
    """Batch level: is an iteration's token total enough, or does its mix matter? (feature sets × learners)"""
    from estimator.study.batch import compare_feature_sets, write_json

    def go() -> None:
        if folds < 2 or seeds < 1:
            raise EstimatorError("--folds must be >= 2 and --seeds >= 1")
        result = compare_feature_sets(runs, k=folds, seeds=seeds)
        typer.echo(
            f"Batch level: {result.iterations} iterations in {result.segments} segments, {result.folds} folds × "
            f"{result.seeds} seeds (MAPE with 95% interval; reduction vs totals, paired)"
        )
        for score in result.scores:
            if score.feature_set == "totals":
                m = score.mape_pct
                typer.echo(f"  {score.learner}, totals: MAPE {_fmt(m.mean, 1)}% [{_fmt(m.low, 1)}, {_fmt(m.high, 1)}]")
        for line in result.lines:
            typer.echo(f"  {line}")
        typer.echo(f"wrote {write_json(result, (out or runs[0] / 'batch') / 'batch.json')}")

    run_command(go)


@app.command()
def validate(
    runs: RunsArg,
    model: Annotated[Path, typer.Option(help="Folder with an iteration model (estimate train --target iteration).")],
    out: Annotated[Path | None, typer.Option(help="Output folder [default: <first run>/validation].")] = None,
) -> None:
    """The iteration model on measured iterations (e.g. replays it never saw): per-iteration, TTFT and
    end-to-end MAPE, against the iterations' noise floor."""
    from estimator.study.batch import validate_iterations, write_json

    def go() -> None:
        from estimator.data.runs import read_manifest
        from estimator.errors import EstimatorError

        for run in runs:
            if read_manifest(run).get("kind") == "serve-bench":
                raise EstimatorError(
                    f"{run} is a serve-bench run: a server reports no iterations to validate against; compare whole "
                    f"requests with estimate experiment simulate-validate MODEL {run} [--load i]"
                )
        result, rows = validate_iterations(model, runs)
        folder = out or runs[0] / "validation"
        typer.echo(
            f"{result.iterations} iterations, {result.requests} requests of {', '.join(result.runs)}: iteration MAPE "
            f"{result.iteration_mape_pct:.2f}% vs noise floor {_fmt(result.noise_floor_mape_pct)}% "
            f"({result.noise_floor_groups} groups; ratio {_fmt(result.ratio_to_floor)}); "
            f"TTFT MAPE {_fmt(result.ttft_mape_pct)}%, end-to-end MAPE {_fmt(result.e2e_mape_pct)}%"
        )
        typer.echo("  MAPE by batch size: " + ", ".join(f"{b}: {v:.1f}%" for b, v in result.mape_by_batch_size.items()))
        typer.echo("  by iteration kind: " + ", ".join(
            f"{k} ({int(v['iterations'])}): MAPE {v['mape_pct']:.1f}%, mean signed {v['signed_pct']:+.1f}%"
            for k, v in result.by_kind.items()))
        if result.intervals:
            typer.echo("  95% bootstrap intervals (iterations / requests resampled): " + ", ".join(
                f"{k} [{lo:.1f}, {hi:.1f}]" for k, (lo, hi) in result.intervals.items()))
        write_json(result, folder / "validation.json")
        rows.to_parquet(folder / "iterations.parquet", index=False)
        typer.echo(f"wrote {folder / 'validation.json'} and {folder / 'iterations.parquet'}")

    run_command(go)


app.command()(report)
app.command()(nightly)
app.command()(simulate)
app.command()(calibrate)
app.command()(serve)
app.add_typer(experiment, name="experiment")
