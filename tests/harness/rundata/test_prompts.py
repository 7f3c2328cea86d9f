from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.rundata.prompts import PromptSource, load_documents, load_tokenizer
from harness.rundata.spec import PRESETS_DIR, SpecError


@pytest.fixture(scope="module")
def source() -> PromptSource:
    return PromptSource(load_documents(None), load_tokenizer(str(PRESETS_DIR / "cpu-tiny")), vocab_size=8192)


@pytest.mark.parametrize("n", [1, 16, 64, 1000, 4000])
def test_prompts_have_exactly_the_requested_tokens(source: PromptSource, n: int) -> None:
    p = source.cut(n, 0)
    assert p.text_tokens == n == len(p.token_ids)
    assert all(0 <= t < 8192 for t in p.token_ids)
    assert p.text.strip()


def test_distinct_prompts_differ_and_classes_rotate(source: PromptSource) -> None:
    source.reseed("x")
    prompts = [source.cut(256, i) for i in range(6)]
    assert len({p.prompt_id for p in prompts}) == 6
    assert len({tuple(p.token_ids) for p in prompts}) == 6
    assert {p.content_class for p in prompts} == {"code", "prose"}


def test_reseed_makes_cuts_reproducible(source: PromptSource) -> None:
    source.reseed("point-a")
    first = [source.cut(128, i).token_ids for i in range(3)]
    source.reseed("point-a")
    assert [source.cut(128, i).token_ids for i in range(3)] == first


def test_ids_beyond_vocab_are_refused() -> None:
    with pytest.raises(SpecError, match="vocab_size"):
        PromptSource(load_documents(None), load_tokenizer(str(PRESETS_DIR / "cpu-tiny")), vocab_size=300)


def test_user_files(tmp_path: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 40
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": text}]}]))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": text}) + "\n")
    plain = tmp_path / "p.txt"
    plain.write_text(text)
    tok = load_tokenizer(str(PRESETS_DIR / "cpu-tiny"))
    for f in (sharegpt, jsonl, plain):
        docs = load_documents(str(f))
        assert docs[0].content_class == "user"
        assert PromptSource(docs, tok, 8192).cut(50, 0).text_tokens == 50


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (None, ".json", "not found"),
        ("", ".txt", "empty"),
        ("{not json", ".json", "not valid JSON"),
        ('{"other": 1}', ".json", "no text field"),
        ('{"text": "a"}\n{oops', ".jsonl", "line 2 is not valid JSON"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, content: str | None, suffix: str, message: str) -> None:
    f = tmp_path / f"p{suffix}"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SpecError, match=message):
        load_documents(str(f))


def test_prompt_file_too_short(tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    src = PromptSource(load_documents(str(f)), load_tokenizer(str(PRESETS_DIR / "cpu-tiny")), 8192)
    with pytest.raises(SpecError, match="too short"):
        src.cut(500, 0)
