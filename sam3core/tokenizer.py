"""CLIP byte-level BPE tokenizer, as SAM 3's text encoder expects it.

Cleaning: ftfy repair, html unescaped twice, whitespace collapsed, lower case. A sequence is
<start_of_text>, the BPE ids, <end_of_text>, padded with 0; an over-long one is cut and ends with <end_of_text>.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
from functools import lru_cache
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import regex

if TYPE_CHECKING:
    import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MERGES_USED = 49152 - 256 - 2
_NOT_A_MERGE = float("inf")
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
WORD_PATTERN = regex.compile(
    START_OF_TEXT + "|" + END_OF_TEXT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class VocabularyError(FileNotFoundError):
    """The BPE vocabulary is missing, unreadable or not the expected file."""


@lru_cache
def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters (BPE never sees raw bytes)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def clean_caption(text: str) -> str:
    # imported here: only strings need it, and a model that is fed token ids (the GPU benchmark's machine has no
    # ftfy) must import without it
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def packaged_vocab_path() -> Path:
    return Path(str(resources.files("sam3core") / "assets" / VOCAB_FILE))


def _read_merges(bpe_path: str | os.PathLike | None) -> list[tuple[str, str]]:
    path = Path(bpe_path) if bpe_path is not None else packaged_vocab_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabularyError(f"cannot read the BPE vocabulary {path}: {exc.strerror or exc}") from exc
    if bpe_path is None and hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise VocabularyError(f"the packaged BPE vocabulary {path} does not match its sha256 {VOCAB_SHA256}")
    try:
        lines = gzip.decompress(data).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"{path} is not a gzipped CLIP BPE merge list: {exc}") from exc
    merges = [tuple(line.split()) for line in lines[1 : MERGES_USED + 1]]
    if len(merges) != MERGES_USED or any(len(pair) != 2 for pair in merges):
        raise VocabularyError(f"{path} does not hold {MERGES_USED} BPE merges")
    return merges  # type: ignore[return-value]


class Sam3Tokenizer:
    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = 32) -> None:
        merges = _read_merges(bpe_path)
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.sot_token_id = self.encoder[START_OF_TEXT]
        self.eot_token_id = self.encoder[END_OF_TEXT]
        self.context_length = context_length
        self.vocab_size = len(self.encoder)
        self._word_cache: dict[str, list[str]] = {START_OF_TEXT: [START_OF_TEXT], END_OF_TEXT: [END_OF_TEXT]}

    def bpe(self, word: str) -> list[str]:
        """Split one pre-tokenized word (in byte-unicode form) into BPE symbols, the last one marked `</w>`."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            first, second = min(pairwise(parts), key=lambda pair: self.bpe_ranks.get(pair, _NOT_A_MERGE))
            if (first, second) not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._word_cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in WORD_PATTERN.findall(clean_caption(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids if i not in (0, self.sot_token_id, self.eot_token_id))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """[N, context_length] int64 token ids, 0 where padded."""
        import torch

        return torch.from_numpy(self.encode_batch(texts, context_length))

    def encode_batch(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """The same ids as NumPy [N, context_length] int64, without importing torch (a decoding worker's case)."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = ids
        return result
