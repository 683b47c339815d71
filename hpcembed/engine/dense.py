"""sentence-transformers' Dense modules after pooling (EmbeddingGemma has two: 768 -> 3072 -> 768), applied by every
engine between pooling and --dimensions' cut and normalizing, as sentence-transformers applies them. They run in
fp32 on the pooled rows: a few rows' worth of work beside the model's, kept at the precision pooling gives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .model import ModelSpec


class DenseStack:
    """The spec's Dense layers on `device`; calling it maps pooled [rows, dim] float32 through them in order."""

    def __init__(self, spec: ModelSpec, device: torch.device):
        from safetensors.torch import load_file
        self.layers = []
        for layer in spec.dense:
            tensors = load_file(f"{layer.path}/model.safetensors")
            weight, bias = tensors.get("linear.weight"), tensors.get("linear.bias")
            if weight is None or tuple(weight.shape) != (layer.out_features, layer.in_features) or \
                    (bias is None) is layer.bias:
                raise ConfigError(f"Dense module {layer.path}: its weights do not match its config.json "
                                  f"({layer.in_features} -> {layer.out_features}, bias {layer.bias})")
            self.layers.append((weight.to(device=device, dtype=torch.float32),
                                None if bias is None else bias.to(device=device, dtype=torch.float32),
                                layer.activation))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for weight, bias, activation in self.layers:
            x = F.linear(x, weight, bias)
            if activation == "tanh":
                x = torch.tanh(x)
        return x
