"""Pooling over padded token states, as sentence-transformers' Pooling module defines each mode; and the mean of
a chunked text's window embeddings (--chunk-pooling mean)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:       # torch is imported where it is used: tokenizer ranks import mean_of_windows alone
    import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [rows, seq, dim], mask [rows, seq] of 0/1 -> [rows, dim]."""
    import torch
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    if mode == "lasttoken":
        last = mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    raise ValueError(f"unknown pooling mode {mode!r}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F
    return F.normalize(x, p=2, dim=1)


def mean_of_windows(embeddings: np.ndarray, chunk_numbers: np.ndarray, normalize: bool) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """(first row of each text, the mean of its windows' embeddings) for rows in text order with each text's
    windows in order (chunk number 0 starts a text); `normalize`: made unit length again, for a model that
    normalizes."""
    starts = np.flatnonzero(chunk_numbers == 0)
    counts = np.diff(np.append(starts, len(chunk_numbers)))
    mean = np.add.reduceat(embeddings.astype(np.float64), starts, axis=0) / counts[:, None]
    if normalize:
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return starts, mean.astype(np.float32)
