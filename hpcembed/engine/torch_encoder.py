"""The generic encoder: any transformers AutoModel, padded batches. It is the CPU path (CI, tests) and the
fallback for architectures the fast GPU path does not cover."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..tokenize.batch import TokenBatch
from .base import Encoder, torch_dtype
from .dense import DenseStack
from .model import ModelSpec
from .pooling import normalize, pool


class TorchEncoder(Encoder):
    engine = "torch"
    pads = True

    def __init__(self, spec: ModelSpec, device: str = "cpu", dtype: str = "fp32"):
        import transformers
        from transformers import AutoModel
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.spec, self.device_name, self.dtype_name = spec, device, dtype
        self.device = torch.device(device)
        started = time.perf_counter()
        self.model = AutoModel.from_pretrained(spec.path, dtype=torch_dtype(dtype)).to(self.device).eval()
        self.dense = DenseStack(spec, self.device) if spec.dense else None
        self.build_seconds = {"weights": time.perf_counter() - started}
        config = self.model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    @torch.inference_mode()
    def encode(self, batch: TokenBatch) -> np.ndarray:
        lengths = batch.lengths
        rows, width = batch.num_rows, int(lengths.max()) if batch.num_rows else 0
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids[mask] = batch.token_ids[batch.offsets[0]: batch.offsets[-1]]
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = torch.from_numpy(mask.astype(np.int64)).to(self.device)
        hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        pooled = mask_t
        if self.spec.pool_skip:           # a prompt the model's pooling leaves out (mean pooling only)
            pooled = mask_t.clone()
            pooled[:, : self.spec.pool_skip] = 0
        out = pool(hidden.float(), pooled, self.spec.pooling)
        if self.dense is not None:
            out = self.dense(out)
        if self.spec.truncate_dim:
            out = out[:, : self.spec.truncate_dim]
        if self.spec.normalize:
            out = normalize(out)
        return out.cpu().numpy().astype(np.float32, copy=False)
