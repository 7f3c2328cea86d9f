"""Benchmark the estimator per feature variant: training time, prediction cost and held-out error.

    python scripts/bench_estimator.py results/<run_id> [more runs] [--variant tokens --variant embedding]

Prints, per variant: training time (s, with the held-out fit), load time (ms), the cost of one prefill and
one decode prediction from a raw dict row (µs, features included; the embedding variant embeds the text on
every call), 1,000 decode rows in one call (µs), predict_request with 1,024 new tokens (µs, computed anew and
answered from its memo), and held-out (by-prompt) MAPE per phase next to the noise-floor MAPE and their ratio.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from estimator import EstimatorError, LatencyEstimator
from estimator.data.runs import load_runs
from estimator.model.features import VARIANTS
from estimator.model.train import train_estimator
from estimator.study.analyze import noise_floor
from estimator.study.references import median_call_us

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _row(frame: Any, axes: list[str], phase: str, with_text: bool) -> dict[str, Any]:
    r = frame.iloc[len(frame) // 2]
    cols = (
        [*axes, "text_tokens"] + (["position"] if phase == "decode" else []) + (["text"] if with_text else [])
    )
    return {c: (r[c].item() if hasattr(r[c], "item") else r[c]) for c in cols}


@app.command()
def main(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    variant: Annotated[
        list[str] | None, typer.Option(help="Variants to bench (repeatable) [default: all].")
    ] = None,
    calls: Annotated[int, typer.Option(help="Single-row calls per median.")] = 300,
) -> None:
    """Bench each variant on the given runs."""
    console = Console(width=160)
    try:
        runset = load_runs(runs)
    except EstimatorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    floors = noise_floor(runset.samples, runset.config_columns)
    variants = variant or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        typer.echo(f"error: unknown variant(s) {', '.join(unknown)}", err=True)
        raise typer.Exit(2)
    pre = runset.with_text(runset.phase("prefill"))
    dec = runset.with_text(runset.phase("decode"))
    rows_1000 = dec.sample(n=min(1000, len(dec)), random_state=0).reset_index(drop=True)
    table = Table(title=f"Estimator benchmark on {', '.join(r.run_id for r in runset.runs)}")
    for c in (
        "variant",
        "train s",
        "load ms",
        "prefill 1 row µs",
        "decode 1 row µs",
        f"decode {len(rows_1000)} rows µs",
        "request 1024 tok µs (new / repeated)",
        "prefill MAPE % (× noise)",
        "decode MAPE % (× noise)",
    ):
        table.add_column(c, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            console.print(f"[dim]training {v}[/dim]")
            t0 = time.perf_counter()
            est = train_estimator(runset, v)  # type: ignore[arg-type]
            train_s = time.perf_counter() - t0
            path = est.save(Path(tmp) / v)
            t0 = time.perf_counter()
            est = LatencyEstimator.load(path)
            load_ms = (time.perf_counter() - t0) * 1e3
            axes = est.meta.axes
            text = v == "embedding"
            n_calls = max(5, calls // 30) if text else calls
            one_pre = _row(pre, axes, "prefill", text)
            one_dec = _row(dec, axes, "decode", text)
            pre_us = median_call_us(partial(est.predict_prefill, one_pre), n_calls)
            dec_us = median_call_us(partial(est.predict_decode, one_dec), n_calls)
            # the embedding variant embeds every distinct prompt of the 1,000 rows: one call is enough
            many_us = median_call_us(
                partial(est.predict_decode, rows_1000), 1 if text else 20, 0 if text else 1
            )
            config = {a: one_pre[a] for a in axes}
            req_text = str(one_pre["text"]) if text else None
            n_tok = int(one_pre["text_tokens"])
            req = partial(est.predict_request, config, n_tok, 1024, req_text)
            req_us = median_call_us(partial(req, cache=False), n_calls)
            cached_us = median_call_us(req, n_calls)
            held = est.meta.held_out.metrics if est.meta.held_out else {}
            cells = []
            for phase in ("prefill", "decode"):
                mape = (held.get(phase) or {}).get("mape_pct")
                floor = floors[phase].mape_pct
                ratio = (
                    mape / floor if mape is not None and np.isfinite(floor) and floor > 0 else float("nan")
                )
                cells.append("–" if mape is None else f"{mape:.2f} ({ratio:.2f}×)")
            table.add_row(
                v,
                f"{train_s:.1f}",
                f"{load_ms:.0f}",
                f"{pre_us:.0f}",
                f"{dec_us:.0f}",
                f"{many_us:.0f}",
                f"{req_us:.0f} / {cached_us:.1f}",
                *cells,
            )
    console.print(table)
    console.print(
        "noise-floor MAPE (same prompt, leave-one-out): "
        + ", ".join(f"{p} {f.mape_pct:.2f}% over {f.groups} groups" for p, f in floors.items())
    )


if __name__ == "__main__":
    app()
