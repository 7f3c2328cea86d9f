"""`profile experiment ...`: the published experiments that drive the real engine (harness/experiments/).

Thin, like the rest of the CLI: parse flags, build the experiment's settings, call it, print. Each keeps its raw
rows in its folder; `--analyze DIR` (grid-replay) or `estimate experiment scheduler DIR` reruns the statistics.
Run them alone on the machine.
"""

from __future__ import annotations

from pathlib import Path

import typer

from harness.cli.replay import fail
from harness.rundata.spec import SpecError

experiment = typer.Typer(
    help="Published experiments on the real engine (run them alone on the machine).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--{name} must be comma-separated numbers, got {text!r}") from None


@experiment.command("scheduler")
def scheduler_command(
    model: Path = typer.Argument(..., help="an iteration model folder (estimate train RUN --target iteration)"),
    out: Path = typer.Option(..., "--out", help="the experiment's folder (resumed when it holds rows)"),
    mix: str = typer.Option("classes", help="the request mix: bimodal, independent or classes (contract/workload.py "
                                            "MIXES; every client declares max_tokens 256, not its true length)"),
    mults: str = typer.Option("0.5,0.7,0.9,1.1,1.3", help="arrival rates as multiples of the measured capacity"),
    seeds: str = typer.Option("1,2,3", help="trace seeds (each a request set of the mix)"),
    policies: str = typer.Option("fcfs,prompt,estimate,estimate-admit,oracle", help="policies, fcfs included"),
    count: int = typer.Option(80, help="requests per trace"),
    max_num_seqs: int = typer.Option(4, help="the engine's max_num_seqs"),
    slo_scale: float | None = typer.Option(None, help="SLO = K x the class's median alone (default: chosen from "
                                                      "the replica before any policy runs)"),
) -> None:
    """The same arrival traces under every scheduling policy on one engine start; goodput with intervals."""
    from harness.experiments.scheduler import SchedulerSpec, run_scheduler

    try:
        spec = SchedulerSpec(model=model, out=out, mix=mix, mults=_floats(mults, "mults"),
                             seeds=[int(x) for x in _floats(seeds, "seeds")],
                             policies=[p.strip() for p in policies.split(",") if p.strip()], count=count,
                             max_num_seqs=max_num_seqs, slo_scale=slo_scale)
        spec.check()
        run_scheduler(spec, lambda line: print(line, flush=True))
    except SpecError as e:
        raise fail(str(e)) from None


@experiment.command("stability")
def stability_command(
    out: Path = typer.Option(..., "--out", help="the study's folder (resumed: the starts in starts.jsonl are kept)"),
    rounds: int = typer.Option(8, help="rounds: every arm once each, each a fresh engine start, in random order"),
    arms: str = typer.Option("", help="comma-separated arms (default: every arm of the path; see the module doc)"),
    path: str = typer.Option("step", help="step (profile sweep's timed steps) or served (vllm serve + vllm bench "
                                          "serve)"),
    analyze: bool = typer.Option(False, "--analyze", help="only the statistics again, from OUT/starts.jsonl"),
) -> None:
    """Where each engine start's speed level comes from: arms x rounds of fresh starts (harness/experiments/
    stability.py); writes starts.jsonl, stability.json and stability.png."""
    from harness.experiments.stability import ARMS, SERVED_ARMS, StabilitySpec, analyze_stability, run_stability

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        if analyze:
            if not (out / "starts.jsonl").is_file():
                raise SpecError(f"{out} holds no starts.jsonl (run the study first)")
            analyze_stability(out, say)
            return
        chosen = [a.strip() for a in arms.split(",") if a.strip()] or list(
            SERVED_ARMS if path == "served" else [a for a in ARMS if a not in ("adopted", "combined")])
        spec = StabilitySpec(out=out, rounds=rounds, arms=chosen, path=path)
        spec.check()
        run_stability(spec, say)
    except SpecError as e:
        raise fail(str(e)) from None


@experiment.command("grid-replay")
def grid_replay_command(
    out: Path = typer.Option(..., "--out", help="the experiment's folder"),
    starts: int = typer.Option(3, help="engine starts"),
    rounds: int = typer.Option(6, help="rounds (a grid set and a trace each) per start"),
    rate: float = typer.Option(3.0, help="the traces' Poisson rate, requests per second"),
    count: int = typer.Option(30, help="requests per trace"),
    heavy_rate: float = typer.Option(0.0, help="also a trace of the same mix at this rate per round (0: none)"),
    tier: int = typer.Option(0, help="the CPU ladder's model (0 cpu-tiny, 1 cpu-small, 2 cpu-base)"),
    analyze: bool = typer.Option(False, "--analyze", help="only the statistics again, from OUT/iterations.parquet"),
) -> None:
    """Grid against replay at equal composition, inside one engine start and across starts."""
    from harness.experiments.grid_replay import GridReplaySpec, analyze_grid_replay, run_grid_replay

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        if analyze:
            if not (out / "iterations.parquet").is_file():
                raise SpecError(f"{out} holds no iterations.parquet (run the experiment first)")
            analyze_grid_replay(out, say)
            return
        if min(starts, rounds, count) < 1 or rate <= 0 or heavy_rate < 0 or tier < 0:
            raise SpecError("--starts, --rounds and --count must be >= 1, --rate > 0, --heavy-rate >= 0")
        run_grid_replay(GridReplaySpec(out, starts, rounds, rate, count, heavy_rate, tier), say)
    except SpecError as e:
        raise fail(str(e)) from None
