"""The run manifest (`results/<run_id>/manifest.json`, docs/results-schema.md), assembled in one place, and the
columns of the run's tables that readers rely on.

Every kind of run (a sweep, a replay, a serve-bench) starts its manifest with the same header, built by
`run_header`: schema version, tool version, git commit and dirty flag, the command line, the resolved spec, the
environment, start and end time, status. What differs by kind follows it as named sections. The engine settings
read back from a running engine (`engine_starts[].effective` for runs the harness drives, `engine` for a
serve-bench run) share one set of keys, `ENGINE_KEYS`, built by `engine_record`; the estimator reads the
scheduler's limits from them (`contract.request.EngineLimits`).

Standard library only.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3
# version 2 only adds tables (iterations, requests): a version-1 sweep resumes as is; version 3 only adds
# serve-bench's loads (loads/<i>/, manifest `loads`): sweeps and replays are written as in version 2
READABLE_VERSIONS = (1, 2, 3)
TABLES = ("samples", "prompts", "telemetry", "iterations", "requests")
KINDS = ("sweep", "replay", "serve-bench")  # a sweep's manifest has no `kind` key (as in every version so far)

# The read-back engine settings every engine record carries (a value may be None where the source cannot tell):
# the scheduler's limits (`EngineLimits`), and what decides what a step computes.
ENGINE_KEYS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "block_size",
    "num_gpu_blocks",
    "max_model_len",
    "dtype",
    "enable_prefix_caching",
)


# The columns each table's readers rely on: the harness writes at least these (and more, docs/results-schema.md),
# and a reader refuses a table without them, naming what is missing.
SAMPLE_COLUMNS = ("point_id", "prompt_id", "prompt_kind", "phase", "text_tokens", "position", "step_index",
                  "latency_ms")
COMPOSITION_COLUMNS = ("num_prefill_seqs", "prefill_tokens", "num_decode_seqs", "decode_ctx_sum", "decode_ctx_max")
ITERATION_COLUMNS = ("segment_id", "iteration", "latency_ms", *COMPOSITION_COLUMNS)
# a request's row, from a replay's driver or from vLLM's client in a serve-bench run: new_tokens is the tokens it
# generated, token_times_ms each token's time from its arrival
REQUEST_COLUMNS = ("request_id", "arrival_s", "text_tokens", "new_tokens", "ttft_ms", "e2e_ms", "token_times_ms")


class ManifestError(ValueError):
    """A manifest that cannot be assembled as asked (a programming error: one line)."""


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second (every time in a manifest)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_info(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the project's checkout, or (None, None) outside one."""
    where = root or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True, timeout=5, check=True
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def run_header(
    kind: str,
    *,
    tool_version: str,
    command: Sequence[str],
    spec: Mapping[str, Any],
    environment: Mapping[str, Any],
    **sections: Any,
) -> dict[str, Any]:
    """A new run's manifest: the common header, then the kind's own `sections` in the order given. The store adds
    `schema_version` and `run_id` when it writes it."""
    if kind not in KINDS:
        raise ManifestError(f"run kind must be one of {', '.join(KINDS)}, got {kind!r}")
    clash = sorted(set(sections) & {"kind", "tool_version", "git_commit", "git_dirty", "command", "spec",
                                    "environment", "started_at", "ended_at", "status"})
    if clash:
        raise ManifestError(f"section(s) {', '.join(clash)} would overwrite the manifest header")
    commit, dirty = git_info()
    head: dict[str, Any] = {} if kind == "sweep" else {"kind": kind}
    head.update(tool_version=tool_version, git_commit=commit, git_dirty=dirty, command=list(command), spec=dict(spec),
                environment=dict(environment), started_at=utc_now(), ended_at=None, status="running")
    return {**head, **sections}


def engine_record(source: str, values: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """One engine's read-back settings: `source` (where they were read), every ENGINE_KEYS entry from `values`
    (ManifestError naming any that is missing), then `extra` (what only this source knows)."""
    missing = [k for k in ENGINE_KEYS if k not in values]
    if missing:
        raise ManifestError(f"engine record from {source} lacks {', '.join(missing)}")
    return {"source": source, **{k: values[k] for k in ENGINE_KEYS}, **extra}


def read_jsonl_dicts(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line (e.g. the nightly history); blank, damaged or non-object
    lines are skipped, and a missing file is an empty list."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
