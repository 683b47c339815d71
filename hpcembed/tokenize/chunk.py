"""Long texts as token windows instead of truncated (--chunk-tokens N --chunk-overlap K).

Each text is tokenized whole, without its special tokens, with the character offsets of every token. Window k
holds content tokens [k*step, k*step + content) with step = content - K, wrapped in the special tokens the
model's template puts around a text, so a window of N tokens is exactly what the model sees for that chunk.
The last window ends at the text's last token; a text that fits is one window (an empty text is one window of
special tokens only, the same input an unchunked job gives the model). A window's character span runs from its
first token's start to its last token's end, in the text as the tokenizer saw it (lowercased first where the
model asks for it).

Chunking uses HF `tokenizers` for every row, whatever --tokenizer-backend says: it gives the offsets.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from ..errors import ConfigError


class Chunker:
    name = "hf-chunked"

    def __init__(self, tokenizer: Tokenizer, window: int, overlap: int, lowercase: bool = False):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.lowercase = lowercase
        probe = self._tok.encode("a")
        content = [k for k, special in enumerate(probe.special_tokens_mask) if not special]
        self.prefix = list(probe.ids[: content[0]])
        self.suffix = list(probe.ids[content[-1] + 1:])
        self.window, self.overlap = window, overlap
        self.content = window - len(self.prefix) - len(self.suffix)
        if self.content < 1:
            raise ConfigError(f"chunk-tokens {window} leaves no room for text beside the model's "
                              f"{len(self.prefix) + len(self.suffix)} special tokens")
        if not 0 <= overlap < self.content:
            raise ConfigError(f"chunk-overlap must be at least 0 and less than the {self.content} text tokens of "
                              f"a {window}-token window; got {overlap}")
        self.step = self.content - overlap
        self.rows_chunked = self.chunks = 0

    @classmethod
    def from_model_dir(cls, model_dir, window: int, overlap: int, lowercase: bool) -> "Chunker":
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
        prefix, suffix = np.array(self.prefix, np.int32), np.array(self.suffix, np.int32)
        tokens: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        chunks: list[np.ndarray] = []
        for k, encoding in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = np.asarray(encoding.ids, np.int32)
            offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
            starts = self.windows(len(ids))
            stops = np.minimum(starts + self.content, len(ids))
            for start, stop in zip(starts, stops):
                tokens.append(np.concatenate((prefix, ids[start:stop], suffix)))
            span = np.zeros((len(starts), 3), np.int64)
            span[:, 0] = np.arange(len(starts))
            if len(ids):
                span[:, 1] = offsets[starts, 0]
                span[:, 2] = offsets[stops - 1, 1]
            chunks.append(span)
            owners.append(np.full(len(starts), k, np.int64))
        self.rows_chunked += len(texts)
        self.chunks += len(tokens)
        return tokens, np.concatenate(owners) if owners else np.empty(0, np.int64), \
            np.concatenate(chunks) if chunks else np.empty((0, 3), np.int64)

    def describe(self) -> dict:
        return {"tokenizer_backend": self.name, "texts_chunked": self.rows_chunked, "chunks": self.chunks}
