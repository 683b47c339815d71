"""What every encoder is: a TokenBatch in, float32 embeddings [rows, dim] out; and the dtypes they run in."""
from __future__ import annotations

import abc

import numpy as np

from ..tokenize.batch import TokenBatch
from .model import ModelSpec


def torch_dtype(name: str):
    """The torch dtype of --dtype's name (torch imported here, not with this module: see engine/__init__.py)."""
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


class Pending:
    """A batch handed to an encoder whose embeddings may not be ready yet."""

    def __init__(self, embeddings: np.ndarray | None = None):
        self._embeddings = embeddings

    def result(self) -> np.ndarray:
        """The embeddings, waiting for them if they are still being computed."""
        return self._embeddings


class Encoder(abc.ABC):
    """Turns a TokenBatch into float32 embeddings [rows, dim], pooled and normalized as the model says."""

    spec: ModelSpec
    engine: str         # 'torch' or 'varlen', as --engine names it
    pads: bool          # whether a batch costs rows * longest row (padding) rather than its real tokens
    dtype_name: str
    device_name: str
    build_seconds: dict[str, float]     # where building it went: weights, compile, graphs
    # Batches that may be launched before the oldest one's result is taken (engine/instances.py): an encoder that
    # queues work on a GPU stream launches the next batch while the previous one runs.
    launch_ahead: int = 1

    @abc.abstractmethod
    def encode(self, batch: TokenBatch) -> np.ndarray: ...

    def launch(self, batch: TokenBatch) -> Pending:
        """Start encoding `batch`; this default encodes it now."""
        return Pending(self.encode(batch))

    def batch_cost(self, lengths: np.ndarray) -> int:
        """Tokens a batch of these (longest-first sorted) lengths counts against the token budget."""
        if not len(lengths):
            return 0
        return int(len(lengths) * lengths.max()) if self.pads else int(lengths.sum())
