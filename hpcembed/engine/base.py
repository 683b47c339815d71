"""What every encoder is: a TokenBatch in, float32 embeddings [rows, dim] out; and the dtypes they run in."""
from __future__ import annotations

import abc

import numpy as np
import torch

from ..tokenize.batch import TokenBatch
from .model import ModelSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Encoder(abc.ABC):
    """Turns a TokenBatch into float32 embeddings [rows, dim], pooled and normalized as the model says."""

    spec: ModelSpec
    engine: str         # 'torch' or 'varlen', as --engine names it
    pads: bool          # whether a batch costs rows * longest row (padding) rather than its real tokens
    dtype_name: str
    device_name: str
    busy_seconds: float = 0.0
    build_seconds: dict[str, float]     # where building it went: weights, compile, graphs

    @abc.abstractmethod
    def encode(self, batch: TokenBatch) -> np.ndarray: ...

    def batch_cost(self, lengths: np.ndarray) -> int:
        """Tokens a batch of these (longest-first sorted) lengths counts against the token budget."""
        if not len(lengths):
            return 0
        return int(len(lengths) * lengths.max()) if self.pads else int(lengths.sum())
