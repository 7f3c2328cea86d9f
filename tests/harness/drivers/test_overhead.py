"""The run summary's harness-overhead figure: multiprocess runs only (in-process the engine's own time is only the
iteration's sampling tail, docs/results-schema.md)."""

from __future__ import annotations

import pandas as pd

from harness.drivers.sweep import overhead_figures


def _samples(mode: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "phase": ["prefill", "decode", "decode"],
            "latency_ms": [12.3, 3.3, 3.2],
            "engine_elapsed_ms": [11.7, 3.15, 3.1],
            "engine_mode": [mode] * 3,
        }
    )


def test_multiprocess_reports_the_ratio() -> None:
    fig = overhead_figures(_samples("multiprocess"))
    assert fig["prefill_harness_over_engine_ratio"] == round(12.3 / 11.7, 4)
    assert 1.0 < fig["decode_harness_over_engine_ratio"] < 1.1


def test_inprocess_reports_no_ratio() -> None:
    fig = overhead_figures(_samples("inprocess"))
    assert not any(k.endswith("_ratio") for k in fig)
    assert "in-process" in fig["harness_over_engine"]
