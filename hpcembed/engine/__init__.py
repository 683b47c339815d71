"""Encoders: load a model directory and turn TokenBatches into pooled, normalized embeddings.

The encoders are imported on first use (PEP 562), not with the package: tokenizer ranks and the conductor read
ModelSpec alone and never import torch, which takes seconds at start-up when many ranks import it at once."""
from __future__ import annotations

import importlib

from .model import ModelSpec, default_model_dir

_LAZY = {"Encoder": ".base", "TorchEncoder": ".torch_encoder", "build_encoder": ".build", "resolve_device": ".build"}

__all__ = ["ModelSpec", "default_model_dir", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
