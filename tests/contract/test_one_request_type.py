"""One request type (contract/request.py): no class outside the contract declares request lengths, every per-stage
record holds a contract request, and what a client declares stays apart from the true output length."""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest

from contract.request import LENGTH_FIELDS, Declared, EngineLimits, Request
from contract.workload import WorkloadError, parse_workload, workload_record, write_workload

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = ("harness", "estimator", "scripts")


def _length_fields(path: Path, root: Path = ROOT) -> list[str]:
    """`Class.field` for each int-typed request-length field a class in `path` declares."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and item.target.id in LENGTH_FIELDS
                and ast.unparse(item.annotation).split(" | ")[0] == "int"
            ):
                found.append(f"{path.relative_to(root)}: {node.name}.{item.target.id}")
    return found


def test_no_class_outside_the_contract_declares_request_lengths() -> None:
    found = [f for pkg in OUTSIDE for p in sorted((ROOT / pkg).rglob("*.py")) for f in _length_fields(p)]
    assert found == []


def test_the_scan_sees_a_class_that_declares_lengths(tmp_path: Path) -> None:
    fake = tmp_path / "twin.py"
    fake.write_text("class Twin:\n    text_tokens: int\n    output_tokens: int | None = None\n    axes: list[int]\n")
    assert _length_fields(fake, tmp_path) == ["twin.py: Twin.text_tokens", "twin.py: Twin.output_tokens"]


def _holds_request(cls: type) -> bool:
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else typing.get_type_hints(cls.__init__)
    return any(h in (Request, Declared) for h in hints.values())


def test_per_stage_records_hold_a_contract_request() -> None:
    from contract.policy import Held
    from estimator.sim import scheduler
    from harness.drivers.batch import InFlight

    stages = [InFlight, Held, scheduler.RequestTrace, scheduler.InEngine, scheduler._Req]
    assert [c.__name__ for c in stages if not _holds_request(c)] == []


def test_a_policy_sees_the_declaration_not_the_true_length() -> None:
    r = Request.make("a", 0.5, 100, 7, max_tokens=256, client_class="code")
    assert (r.text_tokens, r.max_tokens, r.output_tokens, r.client_class) == (100, 256, 7, "code")
    assert not hasattr(r.declared, "output_tokens")
    assert {f.name for f in dataclasses.fields(Declared)}.isdisjoint({"output_tokens", "new_tokens"})
    # without a cap the client asks for exactly what it gets (every workload before the two were told apart)
    assert Request.make("b", 0.0, 10, 5).max_tokens == 5
    with pytest.raises(ValueError, match="exceeds its declared max_tokens 4"):
        Request.make("c", 0.0, 10, 5, max_tokens=4)


def test_declaring_and_generating_change_one_side_only() -> None:
    r = Request.numbered(3, 1.0, 50, 20, max_tokens=64)
    assert r.request_id == "req-00003" and r.index == 3
    p = r.declaring(priority=9)
    assert (p.priority, p.output_tokens, p.max_tokens) == (9, 20, 64)
    g = r.generating(2)
    assert (g.output_tokens, g.max_tokens, g.request_id) == (2, 64, r.request_id)
    assert r.generating(100).max_tokens == 100


def test_workload_lines_carry_the_cap_and_class(tmp_path: Path) -> None:
    text = (
        '{"arrival_s": 0.0, "text_tokens": 8, "new_tokens": 3}\n'
        '{"arrival_s": 0.5, "text_tokens": 9, "new_tokens": 4, "max_tokens": 256, "client_class": "chat"}\n'
    )
    a, b = parse_workload(text)
    assert (a.max_tokens, a.client_class) == (3, None)
    assert (b.max_tokens, b.output_tokens, b.client_class) == (256, 4, "chat")
    path = tmp_path / "w.jsonl"
    write_workload(path, [a, b])
    assert path.read_text() == text  # an old line is written back byte for byte
    assert "max_tokens" not in workload_record(a) and json.loads(path.read_text().splitlines()[1])["max_tokens"] == 256


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"arrival_s": 0, "text_tokens": 8, "new_tokens": 9, "max_tokens": 4}', "max_tokens 4 is below new_tokens 9"),
        ('{"arrival_s": 0, "text_tokens": 8, "new_tokens": 9, "max_tokens": 0}', "max_tokens must be positive"),
        ('{"arrival_s": 0, "text_tokens": 8, "new_tokens": 9, "client_class": ""}', "client_class must be"),
    ],
)
def test_a_bad_cap_or_class_is_one_line(line: str, message: str) -> None:
    with pytest.raises(WorkloadError, match=message) as info:
        parse_workload(line + "\n", "w")
    assert "line 1" in str(info.value) and "\n" not in str(info.value)


def test_engine_limits_from_a_manifest() -> None:
    eff = {"max_num_seqs": 8, "max_num_batched_tokens": 2048, "block_size": 128, "num_gpu_blocks": 40,
           "max_model_len": 4096, "long_prefill_token_threshold": None}
    limits = EngineLimits.from_effective(eff)
    assert (limits.num_blocks, limits.enable_chunked_prefill, limits.long_prefill_token_threshold) == (40, True, 0)
    assert EngineLimits.missing({**eff, "num_gpu_blocks": 0}) == ["num_gpu_blocks"]
    with pytest.raises(KeyError, match="max_model_len"):
        EngineLimits.from_effective({k: v for k, v in eff.items() if k != "max_model_len"})
