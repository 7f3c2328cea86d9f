"""Prompts of real text cut to an exact token count.

The built-in corpus (harness/assets/corpus.jsonl, built by scripts/build_corpus.py) holds Python reference
prose and standard-library code. A user's file can stand in: ShareGPT JSON, JSONL with a text field, or plain
text. Text is tokenized with the serving model's tokenizer where its folder has one, otherwise with the
shipped fallback tokenizer; prompts go to the engine as token ids, so their length is exact.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.rundata.spec import SpecError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CORPUS_PATH = ASSETS / "corpus.jsonl"
FALLBACK_TOKENIZER = ASSETS / "tokenizer.json"
TEXT_KEYS = ("text", "prompt", "content", "value")


class Tokenizer(Protocol):
    """The two calls the prompt cutter needs."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Document:
    doc_id: str
    source: str
    content_class: str
    text: str


@dataclass
class Prompt:
    """A prompt of exactly len(token_ids) tokens."""

    prompt_id: str
    text: str
    token_ids: list[int]
    source: str
    content_class: str

    @property
    def text_tokens(self) -> int:
        return len(self.token_ids)


class HFTokenizer:
    """A `tokenizers` tokenizer loaded from a tokenizer.json file (no network)."""

    def __init__(self, path: Path, name: str) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.name = name

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def load_tokenizer(model_path: str) -> Tokenizer:
    """The model's own tokenizer.json if its folder has one, else the shipped fallback."""
    own = Path(model_path) / "tokenizer.json"
    if own.is_file():
        return HFTokenizer(own, f"{Path(model_path).name}/tokenizer.json")
    return HFTokenizer(FALLBACK_TOKENIZER, "fallback-bpe-8000")


def load_documents(path: str | None) -> list[Document]:
    """Documents from the built-in corpus (path None) or a user's prompts file."""
    if path is None:
        with CORPUS_PATH.open(encoding="utf-8") as f:
            return [Document(d["id"], d["source"], d["content_class"], d["text"]) for d in map(json.loads, f)]
    return _read_user_file(Path(path))


def _read_user_file(path: Path) -> list[Document]:
    if not path.is_file():
        raise SpecError(f"prompts file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise SpecError(f"prompts file is empty: {path}")
    texts: list[str]
    # ValueError: bad JSON, or an integer too long to convert; RecursionError: nesting deeper than Python's stack
    if path.suffix == ".json":
        try:
            texts = _texts_from_json(json.loads(raw), path)
        except SpecError:
            raise
        except (ValueError, RecursionError) as e:
            raise SpecError(f"prompts file {path} is not valid JSON: {_first_line(e)}") from e
    elif path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.extend(_texts_from_json(json.loads(line), path))
            except SpecError:
                raise
            except (ValueError, RecursionError) as e:
                raise SpecError(f"prompts file {path} line {i} is not valid JSON: {_first_line(e)}") from e
    else:
        texts = [t for t in raw.split("\n\n") if t.strip()]
    # a JSON escape can hold a lone surrogate, which neither the tokenizer nor Parquet accept
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts if t.strip()]
    if not texts:
        raise SpecError(
            f"prompts file {path} holds no text (expected ShareGPT JSON, JSONL with a 'text' field, or plain text)"
        )
    return [Document(f"{path.name}:{i}", str(path), "user", t) for i, t in enumerate(texts)]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _texts_from_json(data: Any, path: Path) -> list[str]:
    """ShareGPT records ({conversations: [{from, value}]}), objects with a text field, or strings."""
    if isinstance(data, str):
        return [data]
    if isinstance(data, list):
        return [t for item in data for t in _texts_from_json(item, path)]
    if isinstance(data, dict):
        if isinstance(data.get("conversations"), list):
            return [str(turn.get("value", "")) for turn in data["conversations"] if isinstance(turn, dict)]
        for key in TEXT_KEYS:
            if isinstance(data.get(key), str):
                return [data[key]]
    raise SpecError(
        f"prompts file {path}: a record has no text field ({', '.join(TEXT_KEYS)} or ShareGPT 'conversations')"
    )


class PromptSource:
    """Cuts distinct windows of exact token length from the documents' token streams.

    Documents of one content class are joined into one stream; a prompt is a window of it at a seeded random
    offset, so prompts of one length are different text of the same length. Token ids are checked against the
    model's vocabulary (vLLM does not check them when it has no tokenizer, and its process dies).
    """

    def __init__(self, documents: list[Document], tokenizer: Tokenizer, vocab_size: int, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.seed = seed
        self._rng = random.Random(seed)
        self._used: set[tuple[str, int, int]] = set()
        self.streams: dict[str, tuple[list[int], str]] = {}
        by_class: dict[str, list[Document]] = {}
        for d in documents:
            by_class.setdefault(d.content_class, []).append(d)
        for cls, docs in sorted(by_class.items()):
            ids = tokenizer.encode("\n\n".join(d.text for d in docs))
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise SpecError(
                    f"tokenizer {tokenizer.name} produced id {bad[0]} >= the model's vocab_size {vocab_size}"
                )
            self.streams[cls] = (ids, docs[0].source)
        self.classes = sorted(self.streams)

    def reseed(self, key: str) -> None:
        """Make the next cuts depend only on (seed, key), so a resumed run cuts the same prompts."""
        self._rng = random.Random(f"{self.seed}:{key}")
        self._used.clear()

    @property
    def max_tokens(self) -> int:
        """Longest prompt the longest stream can give."""
        return max(len(ids) for ids, _ in self.streams.values())

    def cut(self, n_tokens: int, index: int) -> Prompt:
        """A new prompt of exactly n_tokens tokens; content class rotates with index."""
        if n_tokens <= 0:
            raise SpecError(f"text_tokens must be positive, got {n_tokens}")
        classes = [c for c in self.classes if len(self.streams[c][0]) >= n_tokens]
        if not classes:
            raise SpecError(
                f"prompt text too short: the longest stream has {self.max_tokens} tokens, {n_tokens} requested"
            )
        cls = classes[index % len(classes)]
        ids, source = self.streams[cls]
        for _ in range(1000):
            start = self._rng.randrange(0, len(ids) - n_tokens + 1)
            if (cls, start, n_tokens) not in self._used:
                break
        self._used.add((cls, start, n_tokens))
        window = ids[start : start + n_tokens]
        digest = hashlib.sha1(f"{self.tokenizer.name}|{cls}|{start}|{n_tokens}".encode()).hexdigest()[:12]
        return Prompt(
            prompt_id=f"p-{digest}",
            text=self.tokenizer.decode(window),
            token_ids=window,
            source=f"{source} [{cls} stream, tokens {start}..{start + n_tokens}]",
            content_class=cls,
        )
