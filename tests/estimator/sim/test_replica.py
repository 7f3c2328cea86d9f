"""The scheduler replica against replays recorded on the real CPU engine (tests/fixtures/replays: a heavy Poisson
and a bursty gamma workload of 120 requests each on cpu-tiny, vLLM 0.32.0): fed each replay's measured iteration
windows, it must reproduce the recorded compositions in >= 99% of iterations."""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator.sim.check import replica_agreement

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "replays"


@pytest.mark.parametrize("name", ["heavy-1", "bursty-1"])
def test_replica_reproduces_recorded_compositions(name: str) -> None:
    agreement = replica_agreement(FIXTURES / name)
    assert agreement.iterations > 250
    assert agreement.share >= 0.99, agreement.first_mismatch
