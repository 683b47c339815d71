"""Encoders: load a model directory and turn TokenBatches into pooled, normalized embeddings."""
from .model import ModelSpec, default_model_dir
from .torch_encoder import Encoder, TorchEncoder, build_encoder, resolve_device

__all__ = ["ModelSpec", "default_model_dir", "Encoder", "TorchEncoder", "build_encoder", "resolve_device"]
