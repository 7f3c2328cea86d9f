"""The closed-form fit per group (tier) over all rows: the curves and coefficients the report draws beside the
measurements (prefill a + b·n + c·n², decode a + b·p)."""

from __future__ import annotations

from dataclasses import dataclass

from estimator.data.runs import RunSet
from estimator.model.closed_form import ClosedForm


@dataclass
class LatencyFits:
    """Closed-form fits pooled over every axis except `group`; `decode` is None when the runs have no decode rows."""

    group: str | None
    prefill: ClosedForm
    decode: ClosedForm | None


def latency_fits(runset: RunSet, group: str | None) -> LatencyFits:
    cols = [group] if group else []
    dec = runset.phase("decode")
    return LatencyFits(
        group=group,
        prefill=ClosedForm("prefill", cols).fit(runset.phase("prefill")),
        decode=ClosedForm("decode", cols).fit(dec) if len(dec) else None,
    )
