"""The sweep: plan the grid, run each point on a real engine, and store what was measured.

The CLI builds a `SweepSpec` and `SweepOptions` and calls `run_sweep`; the same works from Python.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness import __version__
from harness.batch_points import check_batch_spec
from harness.cpu_dtype import AVX2_DECODE_NOTE, machine_dtype_choice
from harness.engine import VllmEngine, engine_environment
from harness.engine_log import LOG_NAME
from harness.measure import (  # re-exported: replay.py and the tests import them from here
    ESTIMATE,
    Plan,
    PlannedRequest,
    Reporter,
    SweepOptions,
    TierModel,
    _effective_mismatch,
    _engine_settings,
    _EnginePass,
    _sampling,
    _StopFlag,
    _warm_up,
    cpu_model,
    measure_group,
    request_order,
)
from harness.prompts import PromptSource, load_documents, load_tokenizer
from harness.spec import (
    SpecError,
    SweepSpec,
    build_spec,
    expand,
    group_by_engine,
    model_config,
    resolve_model,
)
from harness.store import RunStore, check_writable, utc_now
from harness.telemetry import (
    TelemetrySource,
    lock_clocks,
    nvml_device_count,
    open_source,
)

__all__ = [
    "ESTIMATE", "Plan", "PlannedRequest", "SweepOptions", "TierModel", "_EnginePass", "_effective_mismatch",
    "_engine_settings", "_sampling", "_warm_up", "cpu_model", "request_order",
]


@dataclass
class SweepResult:
    run_dir: Path
    status: str
    points_done: int
    points_failed: int
    summary: pd.DataFrame
    figures: dict[str, Any]



def _param_count(cfg: dict[str, Any]) -> int:
    h = int(cfg.get("hidden_size", 0))
    layers = int(cfg.get("num_hidden_layers", 0))
    heads = int(cfg.get("num_attention_heads", 1))
    kv = int(cfg.get("num_key_value_heads", heads))
    hd = int(cfg.get("head_dim", h // max(heads, 1)))
    inter = int(cfg.get("intermediate_size", 4 * h))
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter
    return layers * per_layer + int(cfg.get("vocab_size", 0)) * h


def plan_sweep(spec: SweepSpec) -> Plan:
    """Expand the grid and check every point against its model before anything is measured."""
    models: dict[int, TierModel] = {}
    for tier in spec.axes["tier"]:
        name, path = resolve_model(spec.ladder[tier])
        cfg = model_config(path)
        if "architectures" not in cfg:
            raise SpecError(f"{path}/config.json has no 'architectures' entry")
        ctx = int(cfg.get("max_position_embeddings", 2048))
        models[tier] = TierModel(tier, name, path, int(cfg.get("vocab_size", 0)), ctx, _param_count(cfg))
    longest = max(spec.axes["text_tokens"])
    for m in models.values():
        if longest + spec.max_new_tokens > m.max_context:
            raise SpecError(
                f"text_tokens {longest} + max_new_tokens {spec.max_new_tokens} exceeds the context "
                f"of tier {m.tier} ({m.name}: {m.max_context} tokens)"
            )
    check_batch_spec(spec, min(m.max_context for m in models.values()))
    points = expand(spec)
    return Plan(spec, points, group_by_engine(points), models)


def prompt_sources(plan: Plan) -> dict[str, PromptSource]:
    """One prompt cutter per model path, checked before any engine starts.

    Raises SpecError when the prompt text is too short for the longest `text_tokens` (with that model's
    tokenizer) or the tokenizer gives ids outside the model's vocabulary.
    """
    documents = load_documents(plan.spec.prompts)
    longest = max(plan.spec.axes["text_tokens"])
    where = f"prompts file {plan.spec.prompts}" if plan.spec.prompts else "the built-in corpus"
    sources: dict[str, PromptSource] = {}
    for m in plan.models.values():
        if m.path in sources:
            continue
        source = PromptSource(documents, load_tokenizer(m.path), m.vocab_size, plan.spec.seed)
        if source.max_tokens < longest:
            raise SpecError(
                f"prompt text too short: {where} gives at most {source.max_tokens} tokens with "
                f"{source.tokenizer.name} (tier {m.tier}), text_tokens {longest} requested"
            )
        sources[m.path] = source
    return sources


def _git_info() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(source_info: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """What the run ran on: interpreter, libraries, device; on a CPU, the dtype it computes half precision in and
    why (`cpu_dtype`, harness/cpu_dtype.py)."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **engine_environment(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "nvml_gpus": nvml_device_count(),
        "device": source_info.get("device_name") or cpu_model(),
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }
    env["nvml_available"] = env["nvml_gpus"] > 0
    if device == "cpu":
        choice = machine_dtype_choice()
        env["cpu_dtype"] = choice.as_dict()
        if not choice.native_bf16:  # a known property of this CPU path, not a fault of the run (docs/cpu-dtype.md)
            env["cpu_decode_path"] = AVX2_DECODE_NOTE
    env.update(
        {
            k: v
            for k, v in source_info.items()
            if k in ("driver_version", "uuid", "device_selector", "max_sm_clock_mhz", "power_limit_w")
        }
    )
    return env


@contextmanager
def _stop_on_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    old = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _select_gpu(gpu: int | None) -> None:
    """Make GPU `gpu` (an index in this process's CUDA view) the only device vLLM sees."""
    if gpu is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        os.environ["CUDA_VISIBLE_DEVICES"] = entries[gpu]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def run_sweep(spec: SweepSpec, options: SweepOptions, report: Reporter) -> SweepResult:
    """Run (or resume) a sweep; `report(event, data)` receives progress events for display.

    Bad input (spec, prompts, an unwritable or full output folder, a GPU that is not there) fails here with
    SpecError/StoreError/TelemetryError before a run folder is written or an engine started.
    """
    plan = plan_sweep(spec)
    sources = prompt_sources(plan)
    if options.resume_dir is None:
        check_writable(options.out_root)
    with open_source(options.gpu) as source:
        _select_gpu(options.gpu)
        telemetry = {
            "source": source.name,
            "reason": source.reason
            if source.name == "nvml"
            else f"{source.reason}; NVML sees {nvml_device_count()} GPU(s), so host counters stand in",
            "interval_ms": spec.telemetry_interval_ms,
            "power_field": source.info.get("power_field"),
            "clocks_locked_mhz": options.lock_clocks_mhz,
        }
        store = open_store(plan, options, environment(source.info, spec.device), telemetry, report)
        if options.engine_output is not None:
            options.engine_output.attach(store.run_dir / LOG_NAME)
        with lock_clocks(source, options.lock_clocks_mhz), _stop_on_signals() as stop:
            try:
                status = _run_points(plan, store, options, source, sources, stop, report)
            except KeyboardInterrupt:  # a second Ctrl-C: the engine is already closed, the point not written
                status = "interrupted"
    return _finish(store, plan, status, report)


def open_store(
    plan: Plan,
    options: SweepOptions,
    env: dict[str, Any],
    telemetry: dict[str, Any],
    report: Reporter,
    extra: dict[str, Any] | None = None,
) -> RunStore:
    """Create the run folder with its first manifest, or reopen it for --resume (dropping unfinished writes and
    refusing a run made with another spec). `extra` adds manifest keys (a Ray run's `cluster`)."""
    spec = plan.spec
    if options.resume_dir is not None:
        store = RunStore.open(options.resume_dir)
        for p in store.discard_partial():
            report("log", {"message": f"discarded unfinished write {p.relative_to(store.run_dir)}"})
        manifest = store.update_manifest(
            status="running", resumed_at=utc_now(), resume_command=options.command, **(extra or {})
        )
        if build_spec(manifest.get("spec") or {}) != spec:
            raise SpecError(
                f"--resume: the run in {options.resume_dir} was made with another spec; resume it "
                "with the same flags (or none: the saved spec is used)"
            )
        return store
    commit, dirty = _git_info()
    return RunStore.create(
        options.out_root,
        {
            "tool_version": __version__,
            "git_commit": commit,
            "git_dirty": dirty,
            "command": options.command,
            "spec": spec.model_dump(mode="json"),
            "environment": env,
            "telemetry": telemetry,
            "engine_mode": spec.engine_mode,
            "started_at": utc_now(),
            "ended_at": None,
            "status": "running",
            "points_total": len(plan.points),
            "points_done": 0,
            "points_failed": 0,
            "engine_starts": [],
            "models": {str(t): m.__dict__ for t, m in plan.models.items()},
            **(extra or {}),
        },
        run_id=options.run_id,
    )


def _run_points(
    plan: Plan,
    store: RunStore,
    options: SweepOptions,
    source: TelemetrySource,
    sources: dict[str, PromptSource],
    stop: _StopFlag,
    report: Reporter,
) -> str:
    done = store.done_points()
    todo_groups = [[p for p in g if p.point_id not in done] for g in plan.groups]
    todo_groups = [g for g in todo_groups if g]
    report(
        "start",
        {
            "run_dir": store.run_dir,
            "points_total": len(plan.points),
            "points_done": len(done),
            "engine_starts": len(todo_groups),
        },
    )
    failed = 0  # in this attempt; a resumed run retries earlier failures
    for group in todo_groups:
        outcome = measure_group(
            plan, group, options, source, sources, store, done, stop, report,
            failed_before=failed, engine_factory=VllmEngine,  # looked up here, so tests can patch it
        )
        failed += outcome.failed
        if outcome.status != "done":
            return outcome.status
    return "complete" if failed == 0 else "failed"


def _finish(store: RunStore, plan: Plan, status: str, report: Reporter) -> SweepResult:
    table = store.read_table("samples")
    samples = table.to_pandas() if table is not None else pd.DataFrame()
    figures = overhead_figures(samples)
    summary = summarize(samples, plan.spec)
    manifest = store.update_manifest(status=status, ended_at=utc_now(), summary=figures)
    done = len(store.done_points())
    if status == "failed" and done == len(plan.points):
        status = "complete"  # every failure of an earlier attempt was measured on resume
    manifest = store.update_manifest(
        status=status, points_done=done, points_failed=len(plan.points) - done if status != "interrupted" else 0
    )
    result = SweepResult(store.run_dir, status, done, int(manifest["points_failed"]), summary, figures)
    done_ids = store.done_points()
    report("end", {"result": result, "failures": [f for f in store.failures() if f["point_id"] not in done_ids]})
    return result


def overhead_figures(samples: pd.DataFrame) -> dict[str, Any]:
    """Caller step time over the engine core's own iteration time, per phase (median ratio). None in-process:
    there the engine's time covers only the iteration's sampling tail (docs/results-schema.md)."""
    out: dict[str, Any] = {"rows": len(samples)}
    if samples.empty or "engine_elapsed_ms" not in samples:
        return out
    if "engine_mode" in samples and (samples.engine_mode == "inprocess").any():
        out["harness_over_engine"] = "not reported in-process: the engine's own time covers only sampling"
        return out
    for phase in ("prefill", "decode"):
        s = samples[(samples.phase == phase) & samples.engine_elapsed_ms.notna() & (samples.engine_elapsed_ms > 0)]
        if len(s):
            out[f"{phase}_harness_over_engine_ratio"] = round(float((s.latency_ms / s.engine_elapsed_ms).median()), 4)
            out[f"{phase}_harness_minus_engine_ms"] = round(float((s.latency_ms - s.engine_elapsed_ms).median()), 4)
    return out


def _cv(x: pd.Series) -> float:
    return float(x.std(ddof=1) / x.mean()) if len(x) > 1 and x.mean() > 0 else float("nan")


def summarize(samples: pd.DataFrame, spec: SweepSpec) -> pd.DataFrame:
    """Per tier and config: prefill median (ms) at the shortest, a middle and the longest length, the mean CV of
    prefill across different prompts of one length (%), decode median (ms), and the median CV of decode at equal
    position across different prompts (%)."""
    if samples.empty:
        return pd.DataFrame()
    config = [a for a in spec.axes if a != "text_tokens"]
    lengths = sorted(samples.text_tokens.unique())
    shown = sorted({lengths[0], lengths[len(lengths) // 2], lengths[-1]})
    rows = []
    for key, g in samples.groupby([*config, "model"], sort=True):
        pre = g[g.phase == "prefill"]
        distinct = g[g.prompt_kind == "distinct"]
        row: dict[str, Any] = dict(zip([*config, "model"], key if isinstance(key, tuple) else (key,), strict=True))
        for n in shown:
            row[f"prefill@{n}"] = round(float(pre[pre.text_tokens == n].latency_ms.median()), 2)
        cvs = distinct[distinct.phase == "prefill"].groupby("text_tokens").latency_ms.agg(_cv).dropna()
        row["prefill_cv%"] = round(100 * float(cvs.mean()), 1) if len(cvs) else float("nan")
        dec = distinct[distinct.phase == "decode"]
        row["decode_ms"] = round(float(g[g.phase == "decode"].latency_ms.median()), 2)
        row["decode_cv%"] = round(100 * float(dec.groupby(["text_tokens", "position"]).latency_ms.agg(_cv).median()), 1)
        rows.append(row)
    return pd.DataFrame(rows)
