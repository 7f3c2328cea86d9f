"""The `estimate` CLI on synthetic runs: clean one-line errors (exit 2) and a train → predict round."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from estimator.cli import app
from estimator.errors import EstimatorError

runner = CliRunner()


def _one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_schema_version(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path, schema_version=7)
    for command in (
        ["analyze", str(run)],
        ["train", str(run), "--out", str(tmp_path / "m")],
        ["compare", str(run)],
    ):
        assert "schema_version 7" in _one_line_error(runner.invoke(app, command))


def test_bad_flags(synthetic_run: Path, tmp_path: Path) -> None:
    err = _one_line_error(
        runner.invoke(app, ["train", str(synthetic_run), "--variant", "bag", "--out", str(tmp_path)])
    )
    assert "variant" in err
    assert "does not exist" in _one_line_error(runner.invoke(app, ["analyze", str(tmp_path / "missing")]))
    err = _one_line_error(runner.invoke(app, ["compare", str(synthetic_run), "--variant", "nope"]))
    assert "variants" in err
    err = _one_line_error(
        runner.invoke(
            app, ["predict", "--model", str(tmp_path / "none"), "--text-tokens", "5", "--new-tokens", "2"]
        )
    )
    assert "no meta.json" in err


def test_too_few_prompts_for_a_split(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path, tiers=(1,), top_ks=(0,), lengths=(16,), reps=2, same_repeats=0)
    err = _one_line_error(runner.invoke(app, ["train", str(run), "--out", str(tmp_path / "m")]))
    assert "too few distinct prompts" in err


@pytest.fixture(scope="module")
def cli_model(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    result = runner.invoke(app, ["train", str(synthetic_run), "--variant", "tokens", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held out" in result.stdout
    return out


def test_predict_text_and_json(cli_model: Path) -> None:
    base = ["predict", "--model", str(cli_model), "--tier", "1", "--top-k", "0", "--blocks", "32"]
    result = runner.invoke(app, [*base, "--text-tokens", "100", "--new-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert "prefill" in result.stdout and "request total" in result.stdout
    result = runner.invoke(app, [*base, "--text-tokens", "100", "--new-tokens", "16", "--json"])
    report = json.loads(result.stdout)
    assert report["decode_steps"] == 15
    assert report["total_ms"] == pytest.approx(report["prefill_ms"] + report["decode_ms_total"])
    assert report["decode_ms_total"] == pytest.approx(report["decode_ms_total_exact"])


def test_predict_errors_and_warnings(cli_model: Path) -> None:
    base = ["predict", "--model", str(cli_model), "--tier", "1", "--top-k", "0"]
    assert "blocks" in _one_line_error(
        runner.invoke(app, [*base, "--text-tokens", "10", "--new-tokens", "2"])
    )
    err = _one_line_error(
        runner.invoke(app, [*base, "--blocks", "32", "--text-tokens", "0", "--new-tokens", "2"])
    )
    assert "text_tokens" in err
    err = _one_line_error(
        runner.invoke(
            app, [*base, "--blocks", "32", "--axis", "dtype=bf16", "--text-tokens", "9", "--new-tokens", "2"]
        )
    )
    assert "unknown axis dtype" in err
    err = _one_line_error(runner.invoke(app, [*base, "--blocks", "32", "--text-tokens", "5000", "--new-tokens", "2"]))
    assert "text_tokens=5000 (trained 16..512)" in err and "cannot extrapolate" in err
    long_prompt = [*base, "--blocks", "32", "--text-tokens", "5000", "--new-tokens", "2"]
    result = runner.invoke(app, [*long_prompt, "--allow-unseen"])
    assert result.exit_code == 0
    assert "unseen           text_tokens=5000" in result.stdout


def test_quick_compare_keeps_the_flags_given_beside_it(synthetic_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--quick cuts seeds, references and timed calls to what the verdict reads, and a flag given beside it wins,
    also when the command is not run from a shell (no sys.argv to read)."""
    import estimator.study.compare as compare_mod

    seen: list[object] = []

    def stop_here(spec: object, progress: object = None) -> None:
        seen.append(spec)
        raise EstimatorError("stopped before the comparison runs")

    monkeypatch.setattr(compare_mod, "run_compare", stop_here)
    runner.invoke(app, ["compare", str(synthetic_run), "--quick"])
    runner.invoke(app, ["compare", str(synthetic_run), "--quick", "--seeds", "2", "--references"])
    quick, flagged = seen
    assert (quick.seeds, quick.references, quick.cost_calls, quick.learners) == (1, False, 20, ["lightgbm"])
    assert (flagged.seeds, flagged.references, flagged.cost_calls) == (2, True, 20)
