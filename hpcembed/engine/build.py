"""Choosing and building the encoder for a model and device."""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .base import Encoder
from .model import ModelSpec, default_dtype
from .torch_encoder import TorchEncoder
from .varlen import VarlenEncoder, supports

log = logging.getLogger("hpcembed")


def resolve_device(device: str) -> str:
    """'auto' is cuda when there is a GPU, else cpu; a CUDA device asked for must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} usable CUDA device(s); use --device "
                              "auto or cpu")
    return device


def build_encoder(spec: ModelSpec, device: str, dtype: str, engine: str = "auto", fused_ops: str = "auto",
                  exact_gelu: bool = False, graph_tokens: int = 0, attention: str = "auto") -> Encoder:
    """The padding-free encoder where it serves the model (on CPU its attention runs padded per batch: no fused
    kernels there); transformers' AutoModel otherwise.
    graph_tokens > 0: the varlen encoder on CUDA captures CUDA graphs for batches of up to that many tokens;
    `attention`: its attention kernel (engine/varlen.py)."""
    device = resolve_device(device)
    if dtype == "auto":
        dtype = default_dtype(spec, device)
    if device == "cpu" and dtype == "fp16":
        raise ConfigError("dtype fp16 is not supported on CPU; use fp32 or bf16")
    if engine == "auto":
        # On CPU too: no transformers modelling code to import at start-up, and CI runs the code the GPUs run,
        # less the kernels.
        why = supports(spec)
        if why:
            log.warning("model %s: using the generic transformers encoder, not the padding-free one: %s",
                        spec.name, why)
        engine = "torch" if why else "varlen"
    if dtype == "fp8" and engine != "varlen":
        why = supports(spec) or "--engine torch was asked for"
        raise ConfigError(f"--dtype fp8 runs on the padding-free decoder path only, which {spec.name} cannot take: "
                          f"{why}")
    if engine == "varlen":
        cuda = device.startswith("cuda")
        return VarlenEncoder(spec, device, dtype, fused_ops=fused_ops, gelu_epilogue=cuda and not exact_gelu,
                             graph_tokens=graph_tokens if cuda else 0, attention=attention)
    return TorchEncoder(spec, device, dtype)
