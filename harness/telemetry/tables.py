"""Telemetry as tables: raw samples to a typed frame, and each step's nearest sample and request energy.

Only the standard library loads at import (pandas and numpy when first used), like harness/telemetry/sources.py, which
re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

HOST_COLUMNS: dict[str, str] = {  # counter -> pandas dtype
    "cpu_freq_mhz": "float64",
    "cpu_util_pct": "float64",
    "rss_mb": "float64",
    "load_avg_1m": "float64",
}
NVML_COLUMNS: dict[str, str] = {
    "sm_clock_mhz": "Int64",
    "mem_clock_mhz": "Int64",
    "power_w": "float64",
    "energy_mj": "Int64",
    "temp_c": "Int64",
    "gpu_util_pct": "Int64",
    "mem_util_pct": "Int64",
    "mem_used_mb": "float64",
    "pstate": "Int64",
    "throttle_reasons": "Int64",
}
COLUMNS: dict[str, dict[str, str]] = {"host": HOST_COLUMNS, "nvml": NVML_COLUMNS}

# Bits that are not a slowdown: an idle GPU, and clocks held by a setting (applications clocks, which
# --lock-clocks sets for the whole run; sync boost; display clock). `throttled` counts only the others.
THROTTLE_IGNORED_BITS = 0x1 | 0x2 | 0x10 | 0x100

# Shortest request window whose energy is taken from the energy counter (the counter moves in steps).
MIN_COUNTER_WINDOW_S = 0.1


def telemetry_frame(samples: Sequence[Mapping[str, Any]], source_name: str) -> pd.DataFrame:
    """Samples as a table with the fixed columns and dtypes of `source_name` ("nvml"/"host"): `t_s`, `source`,
    the counters, `error`. The same schema with no rows when there are no samples."""
    import pandas as pd

    counters = COLUMNS[source_name]
    columns = ["t_s", "source", *counters, "error"]
    frame = pd.DataFrame.from_records(list(samples), columns=columns)
    dtypes = {"t_s": "float64", "source": "string", "error": "string", **counters}
    return frame.astype(dtypes)


def join_snapshots(samples: pd.DataFrame, telemetry: pd.DataFrame, max_gap_s: float = 1.0) -> pd.DataFrame:
    """Add to each step row the telemetry sample nearest its midpoint, and each request's energy.

    `samples` needs `t_start_s`, `t_end_s`, `point_id`, `rep`; `telemetry` is the raw table (`t_s` on the same
    clock). Adds `tel_<counter>` (null where no sample lies within `max_gap_s` s), `throttled` (a slowdown
    reason is set, not only THROTTLE_IGNORED_BITS) and `request_energy_j` (J, per (point_id, rep): energy
    counter difference for a window >= 100 ms, else mean power x duration with `request_energy_is_estimate`
    true; NaN without either).
    Row order and index are kept.
    """
    import numpy as np
    import pandas as pd

    counters = [c for c in telemetry.columns if c not in ("t_s", "source", "error")]
    tel = telemetry
    if "t_s" in tel.columns:
        tel = tel[tel["t_s"].notna()].astype({"t_s": "float64"}).sort_values("t_s", kind="stable")
    out = samples.copy()
    mid = ((out["t_start_s"] + out["t_end_s"]) / 2).astype("float64")

    if len(tel) and len(out):
        left = pd.DataFrame({"_mid": mid.to_numpy(), "_row": np.arange(len(out))}).sort_values("_mid")
        right = tel[["t_s", *counters]].rename(columns={c: f"tel_{c}" for c in counters})
        merged = pd.merge_asof(
            left, right, left_on="_mid", right_on="t_s", direction="nearest", tolerance=max_gap_s
        ).sort_values("_row")
        merged.index = out.index
        for c in counters:
            out[f"tel_{c}"] = merged[f"tel_{c}"].astype(tel[c].dtype)
    else:
        for c in counters:
            out[f"tel_{c}"] = pd.Series([None] * len(out), index=out.index, dtype=tel[c].dtype)

    if "tel_throttle_reasons" in out.columns:
        bits = out["tel_throttle_reasons"].astype("float64").fillna(0).to_numpy().astype(np.int64)
        out["throttled"] = (bits & ~THROTTLE_IGNORED_BITS) != 0
    else:
        out["throttled"] = False

    series: dict[str, tuple[Any, Any]] = {}  # counter -> (t_s, values) of the samples that have it
    for c in ("energy_mj", "power_w"):
        if c in tel.columns and "t_s" in tel.columns:
            ok = tel[c].notna().to_numpy()
            series[c] = (tel["t_s"].to_numpy()[ok], tel[c].astype("float64").to_numpy()[ok])
    energy_j = np.full(len(out), np.nan)
    is_estimate = np.zeros(len(out), dtype=bool)
    t_start = out["t_start_s"].to_numpy(dtype="float64")
    t_end = out["t_end_s"].to_numpy(dtype="float64")
    if len(out):
        positions = pd.Series(np.arange(len(out)), index=out.index)
        for _, rows in positions.groupby([out["point_id"], out["rep"]], sort=False):
            idx = rows.to_numpy()
            energy_j[idx], is_estimate[idx] = _request_energy(
                series, float(t_start[idx].min()), float(t_end[idx].max()), max_gap_s
            )
    out["request_energy_j"] = energy_j
    out["request_energy_is_estimate"] = is_estimate
    return out


def _request_energy(
    series: Mapping[str, tuple[Any, Any]], start: float, end: float, max_gap_s: float
) -> tuple[float, bool]:
    """Energy (J) over [start, end] (s) and whether it is a power x time estimate; (nan, False) if unknown."""
    import numpy as np

    duration = end - start
    if "energy_mj" in series and duration >= MIN_COUNTER_WINDOW_S:
        t, mj = series["energy_mj"]
        if len(t) >= 2 and t[0] <= start and t[-1] >= end:
            used = float(np.interp(end, t, mj) - np.interp(start, t, mj))
            if used >= 0:  # a counter that went backwards (driver reload) is no use
                return used / 1000.0, False
    if "power_w" in series:
        t, watts = series["power_w"]
        inside = (t >= start) & (t <= end)
        if inside.any():
            return float(watts[inside].mean()) * duration, True
        if len(t):
            mid = (start + end) / 2
            nearest = int(np.abs(t - mid).argmin())
            if abs(t[nearest] - mid) <= max_gap_s:
                return float(watts[nearest]) * duration, True
    return math.nan, False
