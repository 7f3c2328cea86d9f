"""Build the harness's built-in prompt corpus and fallback tokenizer (run once; outputs are committed).

Sources (known provenance, available offline, PSF licence):
- prose: the Python Language Reference topics shipped in CPython's `pydoc_data.topics`;
- code: source files of a few CPython standard-library modules.

Outputs: `harness/assets/corpus.jsonl` (one document per line: id, source, content_class, text) and
`harness/assets/tokenizer.json` (a byte-level BPE tokenizer with 8,000 ids trained on that corpus, used to cut
prompts for config-only models that ship no tokenizer).
"""

from __future__ import annotations

import json
import pydoc_data.topics
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS = Path(__file__).resolve().parents[1] / "harness" / "assets"
CODE_MODULES = ["argparse.py", "dataclasses.py", "json/decoder.py", "textwrap.py", "functools.py", "fractions.py"]
VOCAB_SIZE = 8000


def documents() -> list[dict[str, str]]:
    """Return the corpus documents in a fixed order."""
    docs = [
        {
            "id": f"pyref:{name}",
            "source": "cpython pydoc_data.topics (PSF licence)",
            "content_class": "prose",
            "text": text.strip(),
        }
        for name, text in sorted(pydoc_data.topics.topics.items())
        if len(text) > 2000
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in CODE_MODULES:
        docs.append(
            {
                "id": f"stdlib:{rel}",
                "source": "cpython Lib/ (PSF licence)",
                "content_class": "code",
                "text": (stdlib / rel).read_text(encoding="utf-8"),
            }
        )
    return docs


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    docs = documents()
    with (ASSETS / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator((d["text"] for d in docs), trainer=trainer)
    tok.save(str(ASSETS / "tokenizer.json"))
    chars = sum(len(d["text"]) for d in docs)
    tokens = sum(len(tok.encode(d["text"]).ids) for d in docs)
    print(f"{len(docs)} documents, {chars} chars, {tokens} tokens, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
