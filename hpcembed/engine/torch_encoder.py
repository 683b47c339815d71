"""The generic encoder: any transformers AutoModel, padded batches. It is the CPU path (CI, tests) and the
fallback for architectures the fast GPU path does not cover."""
from __future__ import annotations

import abc
import logging
import time

import numpy as np
import torch

from ..errors import ConfigError
from ..tokenize.batch import TokenBatch
from .model import ModelSpec
from .pooling import normalize, pool

log = logging.getLogger("hpcembed")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Encoder(abc.ABC):
    """Turns a TokenBatch into float32 embeddings [rows, dim], pooled and normalized as the model says."""

    spec: ModelSpec
    engine: str         # 'torch' or 'varlen', as --engine names it
    pads: bool          # whether a batch costs rows * longest row (padding) rather than its real tokens
    dtype_name: str
    device_name: str
    busy_seconds: float = 0.0

    @abc.abstractmethod
    def encode(self, batch: TokenBatch) -> np.ndarray: ...

    def batch_cost(self, lengths: np.ndarray) -> int:
        """Tokens a batch of these (longest-first sorted) lengths counts against the token budget."""
        if not len(lengths):
            return 0
        return int(len(lengths) * lengths.max()) if self.pads else int(lengths.sum())


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
        self.model = AutoModel.from_pretrained(spec.path, dtype=DTYPES[dtype]).to(self.device).eval()
        config = self.model.config
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    @torch.inference_mode()
    def encode(self, batch: TokenBatch) -> np.ndarray:
        start = time.perf_counter()
        lengths = batch.lengths
        rows, width = batch.num_rows, int(lengths.max()) if batch.num_rows else 0
        ids = np.full((rows, width), self.pad_id, dtype=np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids[mask] = batch.token_ids[batch.offsets[0]: batch.offsets[-1]]
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = torch.from_numpy(mask.astype(np.int64)).to(self.device)
        hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        out = pool(hidden.float(), mask_t, self.spec.pooling)
        if self.spec.normalize:
            out = normalize(out)
        result = out.cpu().numpy().astype(np.float32, copy=False)
        self.busy_seconds += time.perf_counter() - start
        return result


def resolve_device(device: str) -> str:
    """'auto' is cuda when there is a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_encoder(spec: ModelSpec, device: str, dtype: str, engine: str = "auto", compile: bool | None = False,
                  exact_gelu: bool = False, graph_tokens: int = 0) -> Encoder:
    """The padding-free encoder on CUDA where it serves the model; transformers' AutoModel otherwise.
    graph_tokens > 0: the varlen encoder on CUDA captures CUDA graphs for batches of up to that many tokens."""
    from .varlen import VarlenEncoder, supports
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if device == "cpu" and dtype == "fp16":
        raise ConfigError("dtype fp16 is not supported on CPU; use fp32 or bf16")
    if engine == "auto":
        why = supports(spec) if device.startswith("cuda") else "CPU (padded SDPA is the CPU path)"
        if why and device.startswith("cuda"):
            log.warning("model %s: using the generic transformers encoder, not the padding-free one: %s",
                        spec.name, why)
        engine = "torch" if why else "varlen"
    if engine == "varlen":
        if compile is None:
            compile = device.startswith("cuda")
        cuda = device.startswith("cuda")
        return VarlenEncoder(spec, device, dtype, compile=compile, gelu_epilogue=cuda and not exact_gelu,
                             graph_tokens=graph_tokens if cuda else 0)
    return TorchEncoder(spec, device, dtype)
