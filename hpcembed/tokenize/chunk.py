"""Long texts as token windows instead of truncated (--chunk-tokens N --chunk-overlap K).

Window k of a text holds its content tokens [k*step, k*step + content) with step = content - K, wrapped in the
special tokens the model's template puts around a text, so a window of N tokens is exactly what the model sees
for that chunk. The last window ends at the text's last token; a text that fits is one window (an empty text is
one window of special tokens only, the same input an unchunked job gives the model).

Character spans: window k runs from its first token's start to its last token's end, except that the first
window starts at 0 and the last ends at the text's length, so a text's windows cover all of it and a text that
fits in one window spans the whole text. Spans index the text as the tokenizer saw it (lowercased first where the
model asks for it, which changes the length of very few texts).

Chunking tokenizes with HF `tokenizers`, whatever --tokenizer-backend says: the spans need its character offsets
(budtiktok gives none). Offsets are read only for texts longer than one window. A variant that tokenized with
budtiktok first and again with HF only the texts that filled the window was faster per core on the CPU box but
slower on the H200 node (bench/notes/chunking.md).
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from ..errors import ConfigError
from .batch import TokenBatch


class Chunker:
    name = "hf+chunks"

    def __init__(self, tokenizer: Tokenizer, window: int, overlap: int, lowercase: bool = False):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.lowercase = lowercase
        probe = self._tok.encode("a")
        content = [k for k, special in enumerate(probe.special_tokens_mask) if not special]
        self.prefix = np.array(probe.ids[: content[0]], np.int32)
        self.suffix = np.array(probe.ids[content[-1] + 1:], np.int32)
        self.window, self.overlap = window, overlap
        self.content = window - len(self.prefix) - len(self.suffix)
        if self.content < 1:
            raise ConfigError(f"chunk-tokens {window} leaves no room for text beside the model's "
                              f"{len(self.prefix) + len(self.suffix)} special tokens")
        if not 0 <= overlap < self.content:
            raise ConfigError(f"chunk-overlap must be at least 0 and less than the {self.content} text tokens of "
                              f"a {window}-token window; got {overlap}")
        self.step = self.content - overlap
        self.rows_chunked = self.chunks = self.rows_split = 0

    @classmethod
    def for_model(cls, model_dir, window: int, overlap: int, lowercase: bool) -> "Chunker":
        from .hf import load_tokenizer
        return cls(load_tokenizer(model_dir), window, overlap, lowercase)

    def windows(self, length: int) -> np.ndarray:
        """Start of each window over `length` content tokens."""
        count = 1 if length <= self.content else 1 + -(-(length - self.content) // self.step)
        return np.arange(count, dtype=np.int64) * self.step

    def split(self, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(token ids per window, the text each window belongs to, [windows, 3] chunk number and character
        span), windows in text order."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        tokens: list[np.ndarray] = []
        owners: list[int] = []
        spans: list[np.ndarray] = []
        for k, encoding in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = encoding.ids
            if len(ids) <= self.content:        # the whole text is one window
                tokens.append(np.concatenate((self.prefix, np.asarray(ids, np.int32), self.suffix)))
                owners.append(k)
                spans.append(np.array([[0, 0, len(texts[k])]], np.int64))
                continue
            windows, span = self._split_long(texts[k], np.asarray(ids, np.int32), encoding.offsets)
            tokens.extend(windows)
            owners.extend([k] * len(windows))
            spans.append(span)
            self.rows_split += 1
        self.rows_chunked += len(texts)
        self.chunks += len(tokens)
        return tokens, np.array(owners, np.int64), np.concatenate(spans) if spans else np.empty((0, 3), np.int64)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """The windows' token ids, as the encoder gets them (the rate plan measures tokens per second with it)."""
        return self.split(texts)[0]

    def _split_long(self, text: str, ids: np.ndarray, offsets: list) -> tuple[list[np.ndarray], np.ndarray]:
        offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
        starts = self.windows(len(ids))
        stops = np.minimum(starts + self.content, len(ids))
        windows = [np.concatenate((self.prefix, ids[a:b], self.suffix)) for a, b in zip(starts, stops)]
        span = np.zeros((len(starts), 3), np.int64)
        span[:, 0] = np.arange(len(starts))
        span[:, 1] = offsets[starts, 0]
        span[:, 2] = offsets[stops - 1, 1]
        span[0, 1], span[-1, 2] = 0, len(text)
        return windows, span

    def describe(self) -> dict:
        return {"tokenizer_backend": self.name, "texts_chunked": self.rows_chunked, "texts_split": self.rows_split,
                "chunks": self.chunks}


def tokenize_chunk(backend, chunk, unit: int) -> TokenBatch:
    """The valid rows of a RowChunk (io/readers.py) as a TokenBatch: tokenized by `backend` (a Chunker: one row
    per window), or as a token directory holds them."""
    if chunk.tokens is not None:        # a token directory: tokenized by an earlier job
        return TokenBatch.from_token_lists(chunk.tokens, chunk.ids, chunk.rows, unit)
    if isinstance(backend, Chunker):
        tokens, owners, spans = backend.split(chunk.texts)
        return TokenBatch.build(tokens, [chunk.ids[k] for k in owners], np.asarray(chunk.rows)[owners], unit, spans)
    return TokenBatch.build(backend.encode(chunk.texts), chunk.ids, chunk.rows, unit)
