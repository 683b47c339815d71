"""Tokenizer backends behind one interface (`encode(texts) -> list of id lists`, `fingerprint()`), and the
TokenBatch they produce."""
from __future__ import annotations

import logging

from .batch import TokenBatch
from .hf import HFTokenizer

__all__ = ["TokenBatch", "HFTokenizer", "Prompted", "make_tokenizer"]

log = logging.getLogger("hpcembed")


def make_tokenizer(model_dir, max_seq_length: int, lowercase: bool, backend: str = "auto", probe_cache=None):
    """The tokenizer backend for a model. 'auto' takes budtiktok where it is installed and proven identical to
    HF for this tokenizer's pipeline, else HF; asking for budtiktok where it is not is an error. `probe_cache`:
    where budtiktok's start-up probe is kept between runs (hpcembed/cache.py)."""
    from ..errors import ConfigError
    from .budtiktok_backend import BudTikTokTokenizer, unsupported_reason
    hf = HFTokenizer.from_model_dir(model_dir, max_seq_length, lowercase)
    if backend == "hf":
        return hf
    reason = unsupported_reason(model_dir)
    if reason is None:
        return BudTikTokTokenizer(model_dir, hf, probe_cache)
    if backend == "budtiktok":
        raise ConfigError(f"--tokenizer-backend budtiktok cannot be used for {model_dir}: {reason}; "
                          "use --tokenizer-backend hf")
    log.debug("tokenizer backend hf: budtiktok not used because %s", reason)
    return hf


class Prompted:
    """A backend whose texts all start with the job's prompt, prefixed as sentence-transformers prefixes it (the
    whole string before the text, then tokenized and truncated together), so every backend gives the same ids."""

    def __init__(self, backend, prompt: str):
        self.backend, self.prompt = backend, prompt

    def encode(self, texts: list[str]) -> list:
        return self.backend.encode([self.prompt + t for t in texts])

    def __getattr__(self, name):
        return getattr(self.backend, name)
