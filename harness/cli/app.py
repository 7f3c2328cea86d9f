"""`profile`: the harness's command line (thin: parse flags, build a spec, call the library, print)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from harness.cli.experiment import experiment
from harness.cli.replay import replay_command, workload_command
from harness.cli.serve import serve_bench_command
from harness.engine.log import EngineOutput
from harness.engine.slowdown import ENV as SLOWDOWN_ENV
from harness.engine.slowdown import injected_slowdown
from harness.engine.steady import steady_settings
from harness.rundata.spec import (
    CPU_LADDER,
    DEFAULT_CPU_BUDGET,
    GPU_LADDER,
    SpecError,
    SweepSpec,
    build_spec,
    engine_axes,
    load_spec_file,
)
from harness.rundata.store import RunStore, StoreError
from harness.telemetry.sources import TelemetryError

RAY_LOCAL = "local"  # what a bare `--ray` stands for: start a local Ray


def ray_flag_default(argv: list[str]) -> list[str]:
    """`--ray` with no address (last, or followed by another option) means `--ray local`."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--ray" and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, RAY_LOCAL)
            break
    return out


class _App(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sys.argv[:] = ray_flag_default(sys.argv)
        return super().__call__(*args, **kwargs)


app = _App(
    help="Profile prefill and per-position decode latency on a real vLLM engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: a "[default: ...]" or "[engine]" in it is printed, not parsed
)
out = Console()
if not out.is_terminal:  # logs and CI: wide enough for the summary table
    out = Console(width=160)
err = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_POINTS_FAILED = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _int_list(name: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"--{name} takes comma-separated integers, got '{text}'") from None
    if not values:
        raise SpecError(f"--{name} is empty")
    return values


def _gpu_present() -> bool:
    """True when NVML sees at least one GPU (cheap; no vLLM import)."""
    from harness.telemetry.sources import nvml_device_count

    return nvml_device_count() > 0


def resolve_spec(spec_file: Path | None, gpu: int | None, overrides: dict[str, Any]) -> SweepSpec:
    """Spec file (if any) + flag overrides -> a validated spec. The device: --device, else the spec file's, else
    the automatic choice (harness/engine/device.py); why is left in overrides["device_why"]."""
    from harness.engine.device import choose_device

    data: dict[str, Any] = load_spec_file(spec_file) if spec_file else {}
    asked_by = "--device" if overrides.get("device") else f"spec file {spec_file}: device ="
    asked = overrides.get("device") or data.get("device")
    data["device"], overrides["device_why"] = choose_device(asked, gpu, asked_by)
    axes = dict(data.get("axes") or {})
    for axis in ("text_tokens", "tier", "top_k", "blocks"):
        if overrides.get(axis) is not None:
            axes[axis] = overrides[axis]
    if overrides.get("model"):
        data["ladder"] = [overrides["model"]]
        axes["tier"] = [0]
    data["axes"] = axes
    for key in ("reps", "same_prompt_repeats", "max_new_tokens", "prompts", "warmup_requests", "seed", "sampling_seed"):
        if overrides.get(key) is not None:
            data[key] = overrides[key]
    if overrides.get("inprocess"):
        data["engine_mode"] = "inprocess"
    if data.get("trust_remote_code") and not overrides.get("trust_remote_code"):
        raise SpecError("the spec file sets trust_remote_code; a model's own code runs only with --trust-remote-code")
    if overrides.get("trust_remote_code"):
        data["trust_remote_code"] = True
    if overrides.get("telemetry_interval_ms") is not None:
        data["telemetry_interval_ms"] = overrides["telemetry_interval_ms"]
    if overrides.get("dtype"):
        data["engine"] = {**(data.get("engine") or {}), "dtype": overrides["dtype"]}
    asked_axes = any(overrides.get(a) is not None for a in ("text_tokens", "tier", "top_k", "blocks", "model"))
    if overrides.get("budget") is not None:
        data["budget"] = None if overrides["budget"] == "off" else overrides["budget"]
    elif spec_file is None and not asked_axes and data["device"] == "cpu":
        data["budget"] = DEFAULT_CPU_BUDGET  # the embedded CPU default: the whole pipeline in minutes
    return build_spec(data)


STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"


def study_path(name: str) -> Path:
    """A named study spec in studies/ (name or name.toml); SpecError listing them when there is none."""
    path = STUDIES_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))) or "none"
        raise SpecError(f"no study '{name}' in {STUDIES_DIR} (known: {known})")
    return path


def dtype_warnings(spec: SweepSpec) -> list[str]:
    """A warning per asked-for dtype (--dtype, [engine] dtype, an engine:dtype axis) that this CPU emulates."""
    if spec.device != "cpu":
        return []
    from harness.engine.cpu_dtype import emulation_warning, machine_dtype_choice

    asked = [spec.engine["dtype"]] if "dtype" in spec.engine else []
    asked += [v for a in spec.mapping if str(spec.target(a)) == "engine:dtype" for v in spec.axes.get(a, [])]
    found = [emulation_warning(str(d), machine_dtype_choice()) for d in dict.fromkeys(map(str, asked))]
    return [w for w in found if w]


class ConsoleReporter:
    """Progress display: a live bar on a terminal, plain log lines otherwise or with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.live = err.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task: Any = None
        self.t0 = time.perf_counter()
        self.done0 = 0

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(escape(message), highlight=False)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=err.file, flush=True)

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            self.done0 = data["points_done"]
            self.log(
                f"run folder {data['run_dir']}: {data['points_total']} points "
                f"({data['points_done']} already done), {data['engine_starts']} engine configs"
            )
            for w in data.get("workers", []):
                self.log(f"worker {w['worker']}: {w['host']} ({w['ip']}), {w['device']}, vllm {w['vllm']}")
            if self.live:
                self.progress = Progress(
                    TextColumn("[bold]sweep"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("points"),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[last]}"),
                    console=err,
                    transient=False,
                )
                self.progress.start()
                self.task = self.progress.add_task(
                    "sweep", total=data["points_total"], completed=data["points_done"], last="starting engine"
                )
        elif event == "engine":
            noise = ""
            if data.get("log_warnings") or data.get("log_errors"):
                noise = f"; vLLM logged {data['log_warnings']} warning(s), {data['log_errors']} error(s)"
            where = f"[{data['worker']}@{data['node']}] " if "worker" in data else ""
            self.log(
                f"{where}engine start {data['model']} block_size={data['block_size']}: {data['seconds']:.1f} s "
                f"({data['points']} points on it){noise}"
            )
        elif event == "point":
            p = data["point"]
            axes = " ".join(f"{k}={v}" for k, v in p.axes.items())
            last = f"last: prefill {data['prefill_ms']:.2f} ms, decode {data['decode_ms']:.2f} ms"
            if "workers" in data:  # a Ray sweep: where it ran, and points done / engine starts per worker
                workers = data["workers"].items()
                per = ", ".join(f"{n} {w['points_done']} pts/{w['engine_starts']} starts" for n, w in workers)
                last = f"[{data['worker']}@{data['node']}] {last}; workers: {per}"
            if self.progress is not None:
                self.progress.update(self.task, completed=data["done"], last=last)
            else:
                done_now = data["done"] - self.done0
                rate = done_now / max(time.perf_counter() - self.t0, 1e-9)
                eta = (data["total"] - data["done"]) / rate if rate > 0 else math.nan
                self.log(f"point {data['done']}/{data['total']} {axes}: {last}; ETA {eta:.0f} s")
        elif event == "failure":
            where = f" (engine output: {data['engine_log']})" if data.get("engine_log") else ""
            self.log(f"[failed] point {data['point'].point_id} {data['point'].axes}: {data['error']}{where}")
        elif event == "request":  # points finish late in an interleaved pass: show its requests too
            n, of = data["seq"] + 1, data["of"]
            if self.progress is not None:
                self.progress.update(self.task, last=f"request {n}/{of} of this engine start")
            elif n < of and n * 4 // of != (n - 1) * 4 // of:  # plain log: at each quarter of the pass
                self.log(f"request {n}/{of} of this engine start")
        elif event == "log":
            self.log(data["message"])
        elif event == "end" and self.progress is not None:
            self.progress.stop()
            self.progress = None


def print_summary(result: Any, failures: list[dict[str, Any]]) -> None:
    summary = result.summary
    if not summary.empty:
        table = Table(title=f"Summary: {result.run_dir}", show_lines=False)
        for col in summary.columns:
            table.add_column(str(col), justify="right")
        for _, row in summary.iterrows():
            table.add_row(*["" if (isinstance(v, float) and math.isnan(v)) else str(v) for v in row])
        out.print(table)
    fig = result.figures
    if "prefill_harness_over_engine_ratio" in fig:
        out.print(
            f"harness step time / engine core iteration time (median): prefill "
            f"{fig['prefill_harness_over_engine_ratio']:.3f} (+{fig['prefill_harness_minus_engine_ms']:.3f} ms), "
            f"decode {fig.get('decode_harness_over_engine_ratio', math.nan):.3f} "
            f"(+{fig.get('decode_harness_minus_engine_ms', math.nan):.3f} ms)"
        )
    elif "harness_over_engine" in fig:
        out.print(f"harness step time / engine core iteration time: {fig['harness_over_engine']}")
    for f in failures:
        detail = escape(f"{f['point_id']} {f.get('axes')}: {f['error_type']}: {f['error']}")
        out.print(f"[red]failed[/] {detail}", highlight=False)
    out.print(
        f"status: {result.status}; points done {result.points_done}, failed {result.points_failed}; "
        f"results in {result.run_dir}"
    )


@app.command()
def sweep(
    gpu: int | None = typer.Option(None, "--gpu", help="GPU index (in this process's CUDA view) to measure on"),
    device: str | None = typer.Option(
        None, help="cpu or cuda (default: cuda where NVML sees a GPU and the CUDA vLLM build is installed)"
    ),
    spec_file: Path | None = typer.Option(None, "--spec", help="sweep spec, TOML or YAML"),
    study: str | None = typer.Option(
        None, help="a named study spec shipped in studies/ (e.g. full-grid: the whole default grid, no budget)"
    ),
    budget: str | None = typer.Option(
        None, help="wall-clock budget, engine starts included (4m, 90s, 1h30m): the engine configs that fit, "
        f"measured adaptively; 'off' for the full grid [default: {DEFAULT_CPU_BUDGET} for the embedded CPU default, "
        "else off]",
    ),
    text_tokens: str | None = typer.Option(None, help="prompt lengths, e.g. 64,256,1024"),
    tier: str | None = typer.Option(
        None, help=f"model tiers, e.g. 0,1,2 (CPU ladder: {', '.join(CPU_LADDER)}; GPU ladder: {', '.join(GPU_LADDER)})"
    ),
    top_k: str | None = typer.Option(None, help="sampling top_k values (0 = off)"),
    blocks: str | None = typer.Option(None, help="KV-cache block sizes in tokens (CPU: multiples of 32)"),
    reps: int | None = typer.Option(None, help="distinct prompts per point"),
    same_prompt_repeats: int | None = typer.Option(None, help="repeats of one prompt per point (noise floor)"),
    max_new_tokens: int | None = typer.Option(None, help="tokens generated per request (decode positions + 1)"),
    warmup: int | None = typer.Option(None, help="untimed requests after each engine start"),
    seed: int | None = typer.Option(None, help="seed for prompt choice and request order"),
    sampling_seed: int | None = typer.Option(
        None, help="give every request this sampling seed (default: none, as served; on CUDA a seed changes the kernel)"
    ),
    model: str | None = typer.Option(None, help="a local model folder (or preset name) instead of the ladder"),
    prompts: Path | None = typer.Option(None, help="prompt text: ShareGPT JSON, JSONL with 'text', or plain text"),
    out_dir: Path = typer.Option(Path("results"), "--out", help="folder that receives results/<run_id>/"),
    resume: Path | None = typer.Option(None, help="finish an interrupted run in this folder (uses its spec)"),
    name: str | None = typer.Option(
        None, help="run folder name under --out: resumed if unfinished, skipped if complete (for scripts)"
    ),
    dry_run: bool = typer.Option(False, help="print the grid, engine-restart plan and estimated duration"),
    quiet: bool = typer.Option(False, help="plain log lines instead of a live progress bar"),
    fail_fast: bool = typer.Option(False, help="stop at the first failed point"),
    lock_clocks: int | None = typer.Option(None, help="GPU: lock SM clocks to this MHz for the run"),
    canary: bool = typer.Option(
        False, help="time the CPU canary (a fixed torch workload shaped like the engine's) before the first engine "
        "start and after the last point; the manifest keeps both (the nightly normalizes by them)"
    ),
    telemetry_interval_ms: float | None = typer.Option(None, help="telemetry sampling interval (ms)"),
    inprocess: bool = typer.Option(
        False, help="run the engine core in this process (NOT how vLLM serves; labelled in the results)"
    ),
    trust_remote_code: bool = typer.Option(False, help="allow a model folder's own code to run"),
    dtype: str | None = typer.Option(
        None, help="the engine's dtype (default on CPU: bfloat16 only where the CPU runs it natively, else float32)"
    ),
    verbose: bool = typer.Option(False, help="show vLLM's own output live (it always goes to RUN/engine.log)"),
    ray: str | None = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="spread engine configs over Ray workers, one device each: --ray alone starts a local Ray, "
        "--ray auto (or HOST:PORT) joins a running cluster",
    ),
    ray_workers: int | None = typer.Option(None, help="Ray workers (default: one per GPU, or per node on CPU)"),
    ray_cpus_per_worker: int | None = typer.Option(None, help="CPU: cores each worker's engine owns (default: all)"),
    ray_share_device: bool = typer.Option(
        False, help="allow two engines on one device (tests; the manifest marks the run shared_device)"
    ),
    ray_retries: int = typer.Option(1, help="retries of a group whose Ray worker died, each on another worker"),
) -> None:
    """Sweep prompt lengths and serving configs; write results/<run_id>/."""
    from harness.drivers.plan import SweepOptions, plan_sweep, prompt_sources
    from harness.drivers.sweep import run_sweep

    try:
        if name is not None and resume is None and (out_dir / name / "manifest.json").is_file():
            status = RunStore.open(out_dir / name).read_manifest().get("status")
            if status == "complete":
                out.print(f"{out_dir / name} is already complete; nothing to do")
                return
            resume = out_dir / name
            err.print(f"resuming unfinished run {resume} (status {status})", highlight=False)
        device_why = "the resumed run's spec"
        if resume is not None:
            spec = build_spec(RunStore.open(resume).read_manifest()["spec"])
        else:
            overrides: dict[str, Any] = {
                "device": device,
                "text_tokens": _int_list("text-tokens", text_tokens),
                "tier": _int_list("tier", tier),
                "top_k": _int_list("top-k", top_k),
                "blocks": _int_list("blocks", blocks),
                "reps": reps,
                "same_prompt_repeats": same_prompt_repeats,
                "max_new_tokens": max_new_tokens,
                "model": model,
                "prompts": str(prompts) if prompts else None,
                "warmup_requests": warmup,
                "seed": seed,
                "sampling_seed": sampling_seed,
                "inprocess": inprocess,
                "trust_remote_code": trust_remote_code,
                "telemetry_interval_ms": telemetry_interval_ms,
                "dtype": dtype,
                "budget": budget,
            }
            if study is not None:
                if spec_file is not None:
                    raise SpecError("--study and --spec both name a spec; give one")
                spec_file = study_path(study)
            spec = resolve_spec(spec_file, gpu, overrides)
            device_why = overrides["device_why"]
        plan = plan_sweep(spec)
        try:
            slowdown = injected_slowdown()
            steady_settings()  # a malformed steady-engine variable fails here, in one line (harness/engine/steady.py)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        if slowdown:
            err.print(f"warning: {SLOWDOWN_ENV}={slowdown:g}: every engine step is slowed by {slowdown:.0%} "
                      "(the detection study's fake; the manifest records it)", highlight=False, soft_wrap=True)
        for warning in dtype_warnings(spec):
            err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
        if dry_run:
            if spec.prompts is not None:
                prompt_sources(plan)  # a bad or too short prompts file fails the plan too (run_sweep checks it)
            _print_plan(plan, device_why)
            return
        err.print(f"device: {spec.device} ({device_why})", highlight=False, soft_wrap=True)
        engine_output: EngineOutput | None = None
        if EngineOutput.possible():  # not under a test runner's in-process invocation
            engine_output = EngineOutput(verbose)
            out.file, err.file = engine_output.stdout, engine_output.stderr
            engine_output.start()  # before anything imports vLLM
        if gpu is not None:
            from harness.telemetry.sources import open_source

            with open_source(gpu):  # a GPU that is not there fails now, before vLLM is imported
                pass
        if spec.device == "cuda":
            from harness.engine.vllm_engine import engine_environment

            build = engine_environment().get("vllm_build")
            if build != "cuda":
                raise SpecError(
                    f"--gpu needs the CUDA vLLM build; this environment has vllm build {build!r} "
                    "(install the [gpu] extra)"
                )
        if gpu is None and spec.device == "cuda" and ray is None:
            gpu = 0
        options = SweepOptions(
            out_root=out_dir,
            resume_dir=resume,
            run_id=name,
            gpu=gpu,
            fail_fast=fail_fast,
            lock_clocks_mhz=lock_clocks,
            verbose=verbose,
            engine_output=engine_output,
            canary=canary,
        )
        reporter = ConsoleReporter(quiet)
        failures: list[dict[str, Any]] = []
        log_levels = [0, 0]

        def report(event: str, data: dict[str, Any]) -> None:
            if event == "end":
                failures.extend(data["failures"])
            if event == "engine":
                log_levels[0] += data.get("log_warnings", 0)
                log_levels[1] += data.get("log_errors", 0)
            reporter(event, data)

        if ray is not None:
            from harness.drivers.cluster import RayOptions, run_cluster_sweep

            if spec.budget is not None:
                raise SpecError("--budget plans one machine's time; with --ray give --budget off (the full grid)")

            ray_options = RayOptions(
                address=None if ray == RAY_LOCAL else ray, workers=ray_workers,
                cpus_per_worker=ray_cpus_per_worker, share_device=ray_share_device, max_retries=ray_retries,
            )
            result = run_cluster_sweep(spec, options, ray_options, report)
        else:
            result = run_sweep(spec, options, report)
    except (SpecError, StoreError, TelemetryError) as e:
        raise _fail(str(e)) from None
    print_summary(result, failures)
    if engine_output is not None and engine_output.path is not None:
        err.print(
            f"engine output (vLLM, torch, Triton): {log_levels[0]} warning line(s), {log_levels[1]} error line(s) "
            f"at engine starts; see {engine_output.path}",
            highlight=False,
            soft_wrap=True,
        )
    if result.status == "interrupted":
        err.print(f"interrupted: resume with  profile sweep --resume {result.run_dir}", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.points_failed:
        raise typer.Exit(EXIT_POINTS_FAILED)


def _print_plan(plan: Any, device_why: str = "") -> None:
    spec = plan.spec
    out.print(f"device: {spec.device} ({device_why}); engine mode: {spec.engine_mode}", highlight=False, soft_wrap=True)
    axes = Table(title="axes")
    axes.add_column("axis")
    axes.add_column("values")
    axes.add_column("maps to")
    for name, values in spec.axes.items():
        axes.add_row(name, ", ".join(map(str, values)), spec.mapping[name])
    out.print(axes)
    restarts = Table(title=f"engine-restart plan: {len(plan.groups)} engine starts")
    restarts.add_column("#", justify="right")
    for a in engine_axes(spec):
        restarts.add_column(a)
    restarts.add_column("model")
    restarts.add_column("points", justify="right")
    for i, g in enumerate(plan.groups, 1):
        restarts.add_row(
            str(i),
            *[str(g[0].axes[a]) for a in engine_axes(spec)],
            plan.models[int(g[0].axes["tier"])].name,
            str(len(g)),
        )
    out.print(restarts)
    if spec.budget_s is not None:
        _print_budget(plan)
        return
    n_req = len(plan.points) * spec.requests_per_point
    out.print(
        f"{len(plan.points)} points x {spec.requests_per_point} requests ({spec.reps} distinct prompts + "
        f"{spec.same_prompt_repeats} repeats of one) = {n_req} requests, {spec.max_new_tokens} tokens each; "
        f"estimated duration ~{plan.estimated_seconds() / 60:.1f} min (rough)"
    )


def _print_budget(plan: Any) -> None:
    """The budget's plan: which engine configs fit, what each is expected to cost, and the coarse design."""
    from harness.drivers.budget import CostCache, cost_cache_path, plan_budget

    spec = plan.spec
    budget = plan_budget(plan, spec.budget_s, CostCache.load())
    table = Table(title=f"budget {spec.budget} ({spec.budget_s:.0f} s): {len(budget.chosen)} of {len(plan.groups)} "
                  "engine configs fit")
    for col in ("engine config", "start s", "start cost", "coarse points", "coarse s", "measured"):
        table.add_column(col)
    for g, chosen in [(g, True) for g in budget.chosen] + [(g, False) for g in budget.skipped]:
        label = ", ".join(f"{k}={v}" for k, v in g.engine_values.items())
        table.add_row(label, f"{g.start_s:.0f}", g.start_source, str(len(g.coarse)), f"{g.coarse_s:.0f}",
                      "yes" if chosen else "skipped")
    out.print(table)
    lengths = sorted({p.text_tokens for g in budget.chosen for p in g.coarse})
    out.print(
        f"coarse design: text_tokens {', '.join(map(str, lengths))} x every sampling config, {spec.reps} distinct "
        f"prompts + {spec.same_prompt_repeats} repeats of one; planned {budget.planned_s:.0f} s of "
        f"{budget.budget_s:.0f} s, the rest refines where the prediction interval is widest against the noise floor; "
        f"estimated duration {budget.budget_s / 60:.1f} min, the budget (start costs: {cost_cache_path()}; "
        "--budget off for the full grid)",
        highlight=False, soft_wrap=True,
    )


@app.command("env")
def env_command() -> None:
    """Print the detected device, engine build and versions, and what telemetry is available."""
    from harness.engine.cpu_dtype import AVX2_DECODE_NOTE, machine_dtype_choice
    from harness.engine.device import cpu_model
    from harness.engine.vllm_engine import engine_environment
    from harness.telemetry.sources import open_source

    table = Table(title="environment", show_header=False)
    table.add_column("key")
    table.add_column("value")
    for k, v in engine_environment().items():
        table.add_row(k, str(v))
    table.add_row("cpu", f"{cpu_model()} ({__import__('os').cpu_count()} cores)")
    choice = machine_dtype_choice()
    table.add_row("cpu dtype", f"{choice.dtype}: {choice.reason}")
    table.add_row("cpu decode path", AVX2_DECODE_NOTE if not choice.native_bf16 else "native bfloat16 kernels")
    gpu = _gpu_present()
    table.add_row("nvidia gpu (nvml)", "yes" if gpu else "no")
    try:
        with open_source(0 if gpu else None) as source:
            table.add_row("telemetry source", f"{source.name} ({source.reason})")
            for k, v in source.info.items():
                table.add_row(f"  {k}", str(v))
            sample = source.read()
            table.add_row("  counters", ", ".join(k for k, v in sample.items() if v is not None and k != "source"))
    except TelemetryError as e:
        table.add_row("telemetry source", f"unavailable: {e}")
    out.print(table)


@app.command("telemetry")
def telemetry_command(
    seconds: float = typer.Option(10.0, help="how long to watch"),
    interval_ms: float = typer.Option(250.0, help="sampling interval (ms)"),
    gpu: int | None = typer.Option(None, "--gpu", help="GPU index; without it, the host's counters"),
) -> None:
    """Watch telemetry counters live (a health check of a box before a long sweep)."""
    from harness.telemetry.sources import open_source, watch

    try:
        with open_source(gpu) as source:
            out.print(f"source: {source.name} ({source.reason})")
            for sample in watch(source, seconds, interval_ms):
                out.print("  ".join(f"{k}={_fmt(v)}" for k, v in sample.items() if k != "source"), highlight=False)
    except TelemetryError as e:
        raise _fail(str(e)) from None


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


# several requests in flight (harness/cli/replay.py)
app.command("replay")(replay_command)
app.command("workload")(workload_command)
app.command("serve-bench")(serve_bench_command)
app.add_typer(experiment, name="experiment")

