"""The Hugging Face `tokenizers` backend.

The model's tokenizer.json may carry padding and truncation settings of its own (the bundled MiniLM pads and
truncates at 128); sentence-transformers ignores them, truncates at max_seq_length and never pads, so this
backend does the same. Work on giant texts is bounded: a text longer than a window of characters is first
tokenized from a prefix cut at a space, and the prefix is used only when it already yields more tokens than the
truncation keeps, which makes the result identical to tokenizing the whole text.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    # Only a slow tokenizer's vocab ships: let transformers convert it to a fast one.
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True).backend_tokenizer


class HFTokenizer:
    name = "hf"

    def __init__(self, tokenizer: Tokenizer, max_seq_length: int, lowercase: bool = False,
                 long_text_chars: int | None = None):
        self.max_seq_length = max_seq_length
        self.lowercase = lowercase
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_seq_length)
        # Generous: English averages about 4-5 characters per token.
        self.long_text_chars = long_text_chars or max(4096, 16 * max_seq_length)
        self.truncated = 0          # texts cut at max_seq_length (the manifest counts them)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, max_seq_length: int, lowercase: bool = False) -> "HFTokenizer":
        return cls(load_tokenizer(model_dir), max_seq_length, lowercase)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.lowercase:
            texts = [t.lower() for t in texts]
        return self.encode_prepared(texts)

    def encode_prepared(self, texts: list[str]) -> list[list[int]]:
        """`encode` for texts already lowercased where the model asks for it."""
        limit = self.long_text_chars
        long_rows = [k for k, t in enumerate(texts) if len(t) > limit]
        if long_rows:
            texts = list(texts)
            long_texts = [texts[k] for k in long_rows]
            for k in long_rows:
                texts[k] = ""          # placeholder; long texts are encoded below
        encodings = self._tok.encode_batch(texts, add_special_tokens=True)
        self.truncated += sum(1 for e in encodings if e.overflowing)
        out = [e.ids for e in encodings]
        for k, text in zip(long_rows, long_texts if long_rows else ()):
            out[k] = self._encode_long(text)
        return out

    def _encode_long(self, text: str) -> list[int]:
        window = self.long_text_chars
        while window < len(text):
            cut = text.rfind(" ", 0, window)
            if cut > 0:
                self._tok.no_truncation()
                try:
                    ids = self._tok.encode(text[:cut]).ids
                finally:
                    self._tok.enable_truncation(self.max_seq_length)
                # More tokens than truncation keeps: every kept token came from whole words before the cut.
                if len(ids) > self.max_seq_length:
                    self.truncated += 1
                    return self._tok.encode(text[:cut]).ids
            window *= 4
        encoding = self._tok.encode(text)
        self.truncated += bool(encoding.overflowing)
        return encoding.ids

    def describe(self) -> dict:
        return {"tokenizer_backend": self.name, "texts_truncated": self.truncated}

    def fingerprint(self) -> str:
        """Identifies the vocabulary and rules (not the padding and truncation settings, which this backend
        overrides), so pre-tokenized data can be matched to a model."""
        import hashlib
        import json
        rules = json.loads(self._tok.to_str())
        rules.pop("padding", None)
        rules.pop("truncation", None)
        return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:16]
