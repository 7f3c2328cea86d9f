"""The shared workload formats: vLLM's timed trace read and written, gamma arrivals, one-line errors."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from contract.workload import (
    TRACE_CHUNK_TOKENS,
    LengthDist,
    WorkloadError,
    generate_workload,
    parse_workload,
    read_workload,
    write_trace,
)


def test_trace_round_trip_keeps_arrivals_and_lengths(tmp_path: Path) -> None:
    reqs = generate_workload(
        3.0, 20, 7, LengthDist.parse("uniform:10:300", "t"), LengthDist.parse("fixed:5", "n"), 4096
    )
    write_trace(tmp_path / "t.jsonl", reqs)
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [x["input_length"] for x in lines] == [r.text_tokens for r in reqs]
    # one hash id per 16-token chunk, none shared between requests (no common prefix)
    ids = [i for x in lines for i in x["hash_ids"]]
    assert len(ids) == len(set(ids))
    assert all(len(x["hash_ids"]) == -(-x["input_length"] // TRACE_CHUNK_TOKENS) for x in lines)
    back = read_workload(tmp_path / "t.jsonl", allow_trace=True)
    assert [(r.arrival_s, r.text_tokens, r.output_tokens) for r in back] == [
        (r.arrival_s, r.text_tokens, r.output_tokens) for r in reqs
    ]


def test_trace_timestamps_start_at_zero() -> None:
    text = (
        '{"timestamp": 100.5, "input_length": 3, "output_length": 2}\n{"timestamp": 101, "input_length": 4, '
        '"output_length": 1}\n'
    )
    reqs = parse_workload(text, allow_trace=True)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5]


def test_a_trace_is_refused_where_only_the_project_format_is_read() -> None:
    with pytest.raises(WorkloadError, match="unknown key"):
        parse_workload('{"timestamp": 0, "input_length": 3, "output_length": 2}\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"timestamp": 0, "input_length": 3}\n', "line 1: timed-trace line lacks output_length"),
        (
            '{"timestamp": 1, "input_length": 3, "output_length": 2}\n{"timestamp": 0.5, "input_length": 3, '
            '"output_length": 2}\n',
            "line 2: timestamp 0.5 is earlier",
        ),
        ('{"timestamp": "x", "input_length": 3, "output_length": 2}\n', "timestamp must be a finite number"),
        ('{"timestamp": 0, "input_length": 0, "output_length": 2}\n', "input_length must be positive"),
        ('{"timestamp": 0, "input_length": 3, "output_length": 2}\nnot json\n', "line 2: not valid JSON"),
    ],
)
def test_bad_trace_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        parse_workload(text, "trace", allow_trace=True)


def test_gamma_arrivals_keep_the_rate_and_burstiness_one_is_the_old_poisson() -> None:
    fixed = LengthDist.parse("fixed:8", "t")
    poisson = generate_workload(5.0, 4000, 3, fixed, fixed, 4096)
    same = generate_workload(5.0, 4000, 3, fixed, fixed, 4096, burstiness=1.0)
    assert poisson == same
    rng = random.Random("workload:3")  # the draws Poisson arrivals have always used
    assert poisson[1].arrival_s == pytest.approx(round(rng.expovariate(5.0), 6), abs=1e-6)
    bursty = generate_workload(5.0, 4000, 3, fixed, fixed, 4096, burstiness=0.3)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(bursty, bursty[1:], strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.1)
    cv = statistics.stdev(gaps) / statistics.mean(gaps)
    assert cv == pytest.approx(1 / 0.3**0.5, rel=0.15)  # gamma gap CV = 1/sqrt(shape)


def test_burstiness_must_be_positive() -> None:
    fixed = LengthDist.parse("fixed:8", "t")
    with pytest.raises(WorkloadError, match="burstiness must be a positive gamma shape"):
        generate_workload(5.0, 3, 0, fixed, fixed, 4096, burstiness=0.0)
