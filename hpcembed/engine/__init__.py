"""Encoders: load a model directory and turn TokenBatches into pooled, normalized embeddings."""
from .base import Encoder
from .build import build_encoder, resolve_device
from .model import ModelSpec, default_model_dir
from .torch_encoder import TorchEncoder

__all__ = ["ModelSpec", "default_model_dir", "Encoder", "TorchEncoder", "build_encoder", "resolve_device"]
