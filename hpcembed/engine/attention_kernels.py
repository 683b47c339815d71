"""Which attention kernel the padding-free engine runs, as --attention and the model's heads say.

BERT family (Q, K and V as one fused [tokens, 3, heads, d] tensor): hpcembed's Triton kernel for small heads
(engine/triton_attention.py; 2.1x flash attention at MiniLM's shapes on an H200, bench/notes/gpu_stage.md), else
torch's varlen flash attention. Decoders (grouped heads): the grouped Triton kernel where it takes the heads
(2.0-2.3x flash at Qwen3-Embedding's shapes, bench/notes/llm_stage.md), else flash attention. On CPU both run
padded SDPA (engine/padded_attention.py), so CI checks everything around the kernel against transformers.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import decoder
from .padded_attention import attention_padded


def _attention_varlen(qkv, cu, max_len):
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max_len, max_len)


def _attention_triton(qkv, cu, max_len):
    from .triton_attention import varlen_attention
    return varlen_attention(qkv, cu, max_len)


ATTENTION = {"flash": _attention_varlen, "triton": _attention_triton}


def default_attention(head_dim: int) -> str:
    """The Triton kernel where it runs (1.9x flash attention's at MiniLM's shapes, bench/notes/gpu_stage.md),
    else flash attention."""
    try:
        from .triton_attention import supported
    except ImportError:             # no Triton in this install
        return "flash"
    return "triton" if supported(head_dim) else "flash"


def _grouped_triton_runs(heads: int, kv_heads: int, head_dim: int) -> bool:
    try:
        from .triton_attention import grouped_supported
    except ImportError:             # no Triton in this install
        return False
    return grouped_supported(heads, kv_heads, head_dim)


def _attention_padded(qkv, cu, max_len):
    return attention_padded(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_len)


def attention_kernel(weights, is_decoder: bool, cuda: bool, attention: str):
    """(name, kernel) for `attention` ('auto', 'triton' or 'flash') and the model's heads; raises ConfigError where
    'triton' is asked for heads the Triton kernel does not take."""
    if is_decoder:
        w = weights
        runs = w.takes_triton_attention and _grouped_triton_runs(w.heads, w.kv_heads, w.head_dim)
        if attention == "triton" and not runs:
            why = (f"heads ({w.heads} query, {w.kv_heads} key/value, {w.head_dim} wide) are not ones the Triton "
                   "kernel takes" if w.takes_triton_attention else "attention windows or scale are not the "
                   "Triton kernel's")
            raise ConfigError(f"--attention triton: this decoder's {why}; use flash")
        if attention == "auto":
            attention = "triton" if runs else "flash"
    elif attention == "auto" and cuda:
        attention = default_attention(weights.hidden // weights.heads)
    if not cuda:
        return "padded", attention_padded if is_decoder else _attention_padded
    kernels = {"flash": decoder.attention_flash, "triton": decoder.attention_triton} if is_decoder else ATTENTION
    return attention, kernels[attention]
