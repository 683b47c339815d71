"""Loaded by the infinity-emb peer in bench/serve.py (on its PYTHONPATH), nowhere else.

infinity-emb 0.0.78, its latest release, calls a tokenizer's batch_encode_plus, which transformers 5 removed (the GPU
box has transformers 5.17); calling the tokenizer itself is what that method did. Nothing else is changed."""
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
    PreTrainedTokenizerBase.batch_encode_plus = lambda self, batch, **kw: self(batch, **kw)
