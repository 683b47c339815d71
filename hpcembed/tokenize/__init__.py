"""Tokenizer backends behind one interface, and the TokenBatch they produce."""
from .batch import TokenBatch
from .hf import HFTokenizer

__all__ = ["TokenBatch", "HFTokenizer"]
