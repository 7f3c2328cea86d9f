"""The run manifest assembled in one place (contract/manifest.py): the header every kind of run shares, the engine
record every reader relies on, and no other module building either by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from contract.manifest import ENGINE_KEYS, KINDS, ManifestError, engine_record, run_header
from contract.request import EngineLimits

ROOT = Path(__file__).resolve().parents[2]
HEADER = ("tool_version", "git_commit", "git_dirty", "command", "spec", "environment", "started_at", "ended_at",
          "status")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gets_the_same_header(kind: str) -> None:
    m = run_header(kind, tool_version="9.9", command=["profile", "x"], spec={"a": 1}, environment={"cpu": "y"},
                   requests_total=3)
    assert all(k in m for k in HEADER)
    assert (m["status"], m["ended_at"], m["requests_total"], m["spec"]) == ("running", None, 3, {"a": 1})
    assert m.get("kind") == (None if kind == "sweep" else kind)  # a sweep's manifest has never had a kind
    assert m["git_commit"] is None or len(m["git_commit"]) == 40


def test_a_section_cannot_overwrite_the_header_nor_an_unknown_kind_pass() -> None:
    with pytest.raises(ManifestError, match="status would overwrite"):
        run_header("replay", tool_version="1", command=["c"], spec={}, environment={}, status="complete")
    with pytest.raises(ManifestError, match="run kind must be one of"):
        run_header("bench", tool_version="1", command=["c"], spec={}, environment={})


def test_an_engine_record_has_every_key_and_feeds_the_limits() -> None:
    values = {"max_num_seqs": 4, "max_num_batched_tokens": 2048, "enable_chunked_prefill": True, "block_size": 128,
              "num_gpu_blocks": 30, "max_model_len": 4096, "dtype": "float32", "enable_prefix_caching": False}
    rec = engine_record("a test", values, async_scheduling=False)
    assert rec["source"] == "a test" and rec["async_scheduling"] is False
    assert all(k in rec for k in ENGINE_KEYS)
    assert EngineLimits.from_effective(rec).num_blocks == 30
    with pytest.raises(ManifestError, match="lacks dtype"):
        engine_record("a test", {k: v for k, v in values.items() if k != "dtype"})


def _builds_a_manifest(path: Path) -> bool:
    """A dict literal with the header's keys (`git_commit` and `started_at`), or a call with them as keywords."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Call):
            keys = {k.arg for k in node.keywords}
        else:
            continue
        if {"git_commit", "started_at"} <= keys:
            return True
    return False


def test_only_the_contract_assembles_a_manifest_header(tmp_path: Path) -> None:
    builders = [str(p.relative_to(ROOT)) for pkg in ("contract", "harness", "estimator", "scripts")
                for p in sorted((ROOT / pkg).rglob("*.py")) if _builds_a_manifest(p)]
    assert builders == ["contract/manifest.py"]
    by_hand = tmp_path / "by_hand.py"
    by_hand.write_text('m = {"kind": "replay", "git_commit": c, "started_at": now()}\n')
    assert _builds_a_manifest(by_hand)  # the scan sees one built by hand
