"""The engine's own output goes to RUN/engine.log; the terminal gets the harness's lines and one summary."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from harness.engine.log import count_levels

ServedRun = tuple[subprocess.CompletedProcess[str], Path]


def test_count_levels_reads_vllm_and_c10_lines() -> None:
    text = "\n".join(
        [
            "(EngineCore pid=1) WARNING 11-27 13:22:55 [vllm.py:725] Model Runner V2 requires Triton",
            "WARNING 11-27 13:22:55 [cpu.py:224] Triton is not installed.",
            "[W1127 13:22:49.350085975 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy",
            "(EngineCore pid=1) ERROR 11-27 13:22:55 [core.py:1] EngineCore failed to start.",
            "Traceback (most recent call last):",
            "(MainProcess pid=3) INFO 11-27 13:22:56 [llm_engine.py:1] a WARNING inside a message is not one",
            "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
        ]
    )
    assert count_levels(text) == (3, 2)


@pytest.mark.slow
def test_engine_output_goes_to_the_log_not_the_terminal(served_run: ServedRun) -> None:
    proc, run = served_run
    terminal = proc.stdout + proc.stderr
    log = (run / "engine.log").read_text()
    # what vLLM 0.32 CPU prints on every start, and Triton's nanobind leak report at interpreter exit
    assert "Triton is installed, but doesn't include CPU backend" in log
    assert "nanobind: leaked" in log
    for noise in ("Triton is installed", "nanobind", "NUMA binding", "WARNING", "[W1"):
        assert noise not in terminal, noise
    # the harness's own lines are still there, with one summary of the engine's warnings naming the log
    assert "status: complete" in proc.stdout and "engine start cpu-tiny" in proc.stderr
    # an interleaved pass finishes its points at the end: its requests show progress (quiet mode: each quarter)
    assert [line.split("] ")[1] for line in proc.stderr.splitlines() if "request " in line and "/18 " in line] == [
        "request 5/18 of this engine start",
        "request 9/18 of this engine start",
        "request 14/18 of this engine start",
    ]
    summary = [line for line in proc.stderr.splitlines() if line.startswith("engine output")]
    assert len(summary) == 1 and str(run / "engine.log") in summary[0]
    m = json.loads((run / "manifest.json").read_text())
    assert m["engine_starts"][0]["log_warnings"] > 0  # vLLM 0.32 CPU warns e.g. that triton-cpu is missing
    assert f"{m['engine_starts'][0]['log_warnings']} warning line(s)" in summary[0]
    assert proc.stderr.rstrip().splitlines()[-1] == summary[0]  # nothing after it (no leak report)


@pytest.mark.slow
def test_verbose_shows_the_engine_output_live_and_keeps_the_log(tmp_path: Path) -> None:
    from tests.conftest import run_profile

    proc = run_profile(
        "sweep", "--tier", "0", "--blocks", "32", "--text-tokens", "32", "--top-k", "0", "--reps", "1",
        "--same-prompt-repeats", "0", "--max-new-tokens", "2", "--warmup", "0", "--quiet", "--verbose",
        "--out", str(tmp_path), "--name", "run",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "run" / "engine.log").read_text()
    for text in ("Triton is installed, but doesn't include CPU backend", "WARNING"):
        assert text in proc.stderr and text in log, text
    assert "status: complete" in proc.stdout
