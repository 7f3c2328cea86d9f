"""The output-length prediction a policy makes from what a client declares (estimator/sim/lengths.py), on traces
whose answers are known, and the mixes it is learned for (contract/workload.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from contract.request import Declared, Request
from contract.workload import MIXES, OUTPUT_CAP, bimodal, mix_requests, slo_class, write_workload
from estimator.errors import EstimatorError
from estimator.sim.lengths import MIN_GROUP, OutputLengths, prompt_bucket

ROOT = Path(__file__).resolve().parents[3]


def test_the_class_and_prompt_bucket_predict_and_a_thin_group_falls_back() -> None:
    reqs = [Request.make(f"a{i}", 0, 600, 4 + i % 3, max_tokens=256, client_class="code") for i in range(30)]
    reqs += [Request.make(f"b{i}", 0, 60, 30 + i, max_tokens=256, client_class="chat") for i in range(21)]
    reqs += [Request.make(f"c{i}", 0, 20, 100, max_tokens=256, client_class="chat") for i in range(5)]  # thin bucket
    lengths = OutputLengths.fit(reqs)
    assert prompt_bucket(16) == prompt_bucket(31) == 4 and prompt_bucket(32) == 5
    assert lengths.predict(Declared("x", 0, 600, 256, "code")) == 5  # mean of 4, 5, 6
    assert lengths.predict(Declared("x", 0, 60, 256, "chat")) == 40  # mean of 30..50
    # the 16-31 bucket holds 5 < MIN_GROUP requests: the whole chat class answers (mean of 21 + 5 requests)
    thin = lengths.predict(Declared("x", 0, 20, 256, "chat"))
    assert MIN_GROUP > 5 and thin == round((sum(range(30, 51)) + 500) / 26)
    # given what it has produced, the expected total of those still running; never below produced + 1, nor the cap
    assert lengths.predict(Declared("x", 0, 60, 256, "chat"), produced=45) == 48
    assert lengths.predict(Declared("x", 0, 60, 256, "chat"), produced=60) == 61
    assert lengths.predict(Declared("x", 0, 60, 32, "chat")) == 32  # a cap never seen: its class, clipped
    assert OutputLengths.fit(reqs, "p90").predict(Declared("x", 0, 60, 256, "chat")) == 48
    with pytest.raises(EstimatorError, match="statistic"):
        OutputLengths.fit(reqs, "median")


def test_a_trace_file_trains_it_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    write_workload(tmp_path / "t.jsonl", mix_requests("classes", 1.0, 400, 1000))
    lengths = OutputLengths.from_file(tmp_path / "t.jsonl")
    code = lengths.predict(Declared("x", 0, 640, OUTPUT_CAP, "code"))
    chat = lengths.predict(Declared("x", 0, 64, OUTPUT_CAP, "chat"))
    assert 6 <= code <= 16 and 50 <= chat <= 110
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 0}\n')
    with pytest.raises(EstimatorError, match="output-length training trace: .*line 1"):
        OutputLengths.from_file(tmp_path / "bad.jsonl")


def test_the_mixes_declare_a_cap_and_their_rank_correlation_is_as_designed() -> None:
    rho = {}
    for name in MIXES:
        reqs = mix_requests(name, 1.0, 2000, 7)
        assert all(r.max_tokens == OUTPUT_CAP >= r.output_tokens >= 1 for r in reqs)
        assert mix_requests(name, 1.0, 2000, 7) == reqs and mix_requests(name, 1.0, 2000, 8) != reqs
        rho[name] = spearmanr([r.text_tokens for r in reqs], [r.output_tokens for r in reqs])[0]
    assert rho["bimodal"] > 0.5 and abs(rho["independent"]) < 0.1 and rho["classes"] < -0.5
    # (a) replays the earlier bimodal lengths and arrivals; only the declared cap differs
    old, new = bimodal(2.0, 50, 3), mix_requests("bimodal", 2.0, 50, 3)
    assert [(r.text_tokens, r.output_tokens, r.arrival_s) for r in old] == [
        (r.text_tokens, r.output_tokens, r.arrival_s) for r in new]
    classes = mix_requests("classes", 1.0, 400, 1)
    assert {r.client_class for r in classes} == {"code", "chat"}
    code = np.array([r.text_tokens for r in classes if r.client_class == "code"])
    assert code.min() >= 256 and slo_class(900, None) == "long" and slo_class(900, "chat") == "chat"


def test_kept_answers_are_the_ones_computed_afresh() -> None:
    """predict keeps its answer per (class, prompt bucket, cap, produced): every kept answer equals the one a fresh
    computation gives, for requests that share a key and ones that do not."""
    lengths = OutputLengths.from_file(ROOT / "studies" / "scheduler" / "classes" / "lengths-train.jsonl")
    asks = [(Declared(f"r{i}", 0, n, cap, c), produced) for i, (n, cap, c, produced) in enumerate(
        [(n, cap, c, p) for n in (20, 31, 64, 700) for cap in (32, 256) for c in ("chat", "code", None)
         for p in (0, 5, 40)])]
    first = [lengths.predict(d, p) for d, p in asks]
    kept = [lengths.predict(d, p) for d, p in asks]
    afresh = []
    for d, p in asks:
        lengths.forget()
        afresh.append(lengths.predict(d, p))
    assert first == kept == afresh
    assert len(set(afresh)) > 3  # the keys do separate the answers


def test_decision_speed_times_both_estimate_policies_on_a_committed_mix() -> None:
    from estimator.study.speed import decision_speed

    rows = decision_speed(ROOT / "studies" / "scheduler" / "classes", held_counts=(4, 8), decisions=5)
    assert [(r[0], r[1]) for r in rows] == [("estimate", "4"), ("estimate", "8"), ("estimate-admit", "4"),
                                            ("estimate-admit", "8")]
    assert all(float(r[2].replace(",", "")) > 0 and float(r[3].replace(",", "")) >= float(r[2].replace(",", ""))
               for r in rows)
    # a mix without declared classes: its SLOs are by prompt length (short / long), as the experiment passes them
    bimodal = decision_speed(ROOT / "studies" / "scheduler" / "bimodal", held_counts=(4,), decisions=3)
    assert [r[0] for r in bimodal] == ["estimate", "estimate-admit"]
