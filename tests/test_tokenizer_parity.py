"""Sam3Tokenizer gives the official SAM 3 tokenizer's ids on a corpus of hard captions.

The ids in `tests/data/tokenizer_corpus.json` were produced by Meta's `SimpleTokenizer` (sam3 0.1.4) with the
packaged vocabulary at context length 32 (`tools/make_tokenizer_corpus.py`); the official package is not
needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sam3core import Sam3Tokenizer

CORPUS_PATH = Path(__file__).parent / "data" / "tokenizer_corpus.json"
START_ID, END_ID = 49406, 49407


@pytest.fixture(scope="module")
def corpus() -> dict:
    return json.loads(CORPUS_PATH.read_text())


@pytest.fixture(scope="module")
def tokenizer(corpus: dict) -> Sam3Tokenizer:
    return Sam3Tokenizer(context_length=corpus["context_length"])


def test_corpus_covers_the_hard_cases(corpus: dict) -> None:
    texts = [entry["text"] for entry in corpus["entries"]]
    rows = [entry["ids"] for entry in corpus["entries"]]
    assert len(texts) >= 220
    assert "" in texts
    assert all(len(row) == corpus["context_length"] for row in rows)
    full = [row for row in rows if row[-1] != 0]
    assert len(full) >= 5 and all(row[-1] == END_ID for row in full), "truncated captions must end with the end token"
    assert any("\t" in text or "\n" in text for text in texts)
    assert any(ord(char) > 0xFFFF for text in texts for char in text), "astral characters (emoji) missing"


def test_ids_match_official_tokenizer_on_whole_corpus(corpus: dict, tokenizer: Sam3Tokenizer) -> None:
    texts = [entry["text"] for entry in corpus["entries"]]
    expected = torch.tensor([entry["ids"] for entry in corpus["entries"]], dtype=torch.long)
    actual = tokenizer(texts)
    assert actual.dtype == torch.long
    assert actual.shape == expected.shape
    wrong = [index for index in range(len(texts)) if not torch.equal(actual[index], expected[index])]
    report = "\n".join(
        f"{texts[i]!r}:\n  official {expected[i].tolist()}\n  sam3core {actual[i].tolist()}" for i in wrong[:8]
    )
    assert not wrong, f"{len(wrong)} of {len(texts)} captions tokenized differently:\n{report}"


def test_single_caption_call_matches_batch(corpus: dict, tokenizer: Sam3Tokenizer) -> None:
    """A lone string is a batch of one; the per-caption result must not depend on its neighbours."""
    for entry in corpus["entries"][::25]:
        assert tokenizer(entry["text"])[0].tolist() == entry["ids"], repr(entry["text"])
