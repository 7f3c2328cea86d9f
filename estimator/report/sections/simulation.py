"""Workload simulation: `estimate simulate` against measured replays and live servers it never saw (the rows of
`estimate experiment simulate-validate --json`)."""

from __future__ import annotations

from estimator.report.document import SECTIONS, Bullets, Note, Paragraph, Section, Table
from estimator.sim.validation import TARGETS, SimulationValidation, ci_text


def simulation_section(result: SimulationValidation | str | None) -> Section:
    sec = Section("simulation", SECTIONS["simulation"])
    if result is None:
        sec.add(
            Note(
                "No simulation validation: `estimate experiment simulate-validate MODEL RUN... --json FILE`, then "
                "`estimate report ... --simulation FILE`."
            )
        )
        return sec
    if isinstance(result, str):
        sec.add(Note(f"Simulation validation unreadable: {result}"))
        return sec
    o = result.overheads
    sec.add(
        Paragraph(
            f"Each measured workload's arrivals alone go through the scheduler replica with model `{result.model}`; "
            f"serving overheads {float(o['iteration_ms'] or 0):.3f} ms per iteration, "
            f"{float(o.get('sequence_ms') or 0):.3f} ms per request in an iteration and "
            f"{float(o['request_ms'] or 0):.2f} ms per request (fitted on {o['fitted_on'] or 'nothing'}). Signed error "
            "of each statistic, % [95% bootstrap interval over requests]; TTFT as the client receives it, TPOT "
            f"without the first token (vLLM's benchmark). Targets: E2E mean, p90, p99 within ±{TARGETS['e2e']:g}%, "
            f"TTFT mean and p90 within ±{TARGETS['ttft']:g}%. SLO: 2× the measured median TTFT and TPOT."
        )
    )
    rows = [
        [
            r.name,
            r.source,
            str(r.requests),
            f"{r.e2e_mape.value:.1f}",
            ci_text(r.e2e["mean"]),
            ci_text(r.e2e["p90"]),
            ci_text(r.e2e["p99"]),
            f"{r.ttft_mape.value:.1f}",
            ci_text(r.ttft["mean"]),
            ci_text(r.ttft["p90"]),
            ci_text(r.tpot["mean"]),
            f"{r.slo_measured_pct:.0f} / {r.slo_simulated_pct:.0f}",
            "met" if r.meets_targets() else "missed",
        ]
        for r in result.rows
    ]
    sec.add(
        Table(
            [
                "workload",
                "measured by",
                "requests",
                "E2E MAPE %",
                "E2E mean",
                "E2E p90",
                "E2E p99",
                "TTFT MAPE %",
                "TTFT mean",
                "TTFT p90",
                "TPOT mean",
                "SLO met % meas. / sim.",
                "targets",
            ],
            rows,
        )
    )
    queue = [
        f"{r.name}: queueing measured {r.queue_measured_ms:.1f} ms, simulated {r.queue_simulated_ms:.1f} ms"
        for r in result.rows
        if r.queue_measured_ms is not None and r.queue_simulated_ms is not None
    ]
    if queue:
        sec.add(Bullets(queue))
    return sec
