"""Long texts as token windows instead of truncated (--chunk-tokens N --chunk-overlap K).

Window k of a text holds its content tokens [k*step, k*step + content) with step = content - K, wrapped in the
special tokens the model's template puts around a text, so a window of N tokens is exactly what the model sees
for that chunk. The last window ends at the text's last token; a text that fits is one window (an empty text is
one window of special tokens only, the same input an unchunked job gives the model).

Character spans: window k runs from its first token's start to its last token's end, except that the first
window starts at 0 and the last ends at the text's length, so a text's windows cover all of it and a text that
fits in one window spans the whole text. Spans index the text as the tokenizer saw it (lowercased first where the
model asks for it, which changes the length of very few texts).

Most texts fit in one window, so the job's tokenizer backend (budtiktok where it applies, ids identical to HF)
tokenizes every text first, truncating at N. Only texts that fill the window may be longer; those are tokenized
again, whole, by HF `tokenizers`, which gives the character offsets the spans need.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from ..errors import ConfigError


class Chunker:
    def __init__(self, backend, tokenizer: Tokenizer, window: int, overlap: int, lowercase: bool = False):
        """`backend`: the job's tokenizer backend, truncating at `window` tokens; `tokenizer`: the model's HF
        tokenizer, for the texts longer than a window."""
        self.backend, self._tok = backend, tokenizer
        self.name = f"{backend.name}+chunks"
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
    def for_model(cls, model_dir, window: int, overlap: int, lowercase: bool, backend: str = "hf") -> "Chunker":
        """`backend`: as --tokenizer-backend says (make_tokenizer)."""
        from . import make_tokenizer
        from .hf import load_tokenizer
        return cls(make_tokenizer(model_dir, window, lowercase, backend), load_tokenizer(model_dir), window, overlap,
                   lowercase)

    def windows(self, length: int) -> np.ndarray:
        """Start of each window over `length` content tokens."""
        count = 1 if length <= self.content else 1 + -(-(length - self.content) // self.step)
        return np.arange(count, dtype=np.int64) * self.step

    def split(self, texts: list[str]) -> tuple[list, np.ndarray, np.ndarray]:
        """(token ids per window, the text each window belongs to, [windows, 3] chunk number and character
        span), windows in text order."""
        first = self.backend.encode(texts)
        prepared = [t.lower() for t in texts] if self.lowercase else texts
        # Texts that filled the window may be longer: tokenized again, whole, with offsets.
        long_rows = [k for k, ids in enumerate(first) if len(ids) >= self.window]
        split = dict(zip(long_rows, map(self._split_long, (prepared[k] for k in long_rows), self._tok.encode_batch(
            [prepared[k] for k in long_rows], add_special_tokens=False))))
        tokens: list = []
        owners: list[int] = []
        spans: list[np.ndarray] = []
        for k, ids in enumerate(first):
            if k in split:
                windows, span = split[k]
                tokens.extend(windows)
                owners.extend([k] * len(windows))
                spans.append(span)
            else:                               # not cut: the whole text is this one window
                tokens.append(ids)
                owners.append(k)
                spans.append(np.array([[0, 0, len(prepared[k])]], np.int64))
        self.rows_chunked += len(texts)
        self.rows_split += len(long_rows)
        self.chunks += len(tokens)
        return tokens, np.array(owners, np.int64), np.concatenate(spans) if spans else np.empty((0, 3), np.int64)

    def _split_long(self, text: str, encoding) -> tuple[list[np.ndarray], np.ndarray]:
        ids = np.asarray(encoding.ids, np.int32)
        offsets = np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        starts = self.windows(len(ids))
        stops = np.minimum(starts + self.content, len(ids))
        windows = [np.concatenate((self.prefix, ids[a:b], self.suffix)) for a, b in zip(starts, stops)]
        span = np.zeros((len(starts), 3), np.int64)
        span[:, 0] = np.arange(len(starts))
        if len(ids):
            span[:, 1] = offsets[starts, 0]
            span[:, 2] = offsets[stops - 1, 1]
        span[0, 1], span[-1, 2] = 0, len(text)
        return windows, span

    def describe(self) -> dict:
        out = {k: v for k, v in self.backend.describe().items() if k != "texts_truncated"}
        return {**out, "tokenizer_backend": self.name, "texts_chunked": self.rows_chunked,
                "texts_split": self.rows_split, "chunks": self.chunks}
