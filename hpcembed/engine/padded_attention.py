"""Varlen attention on CPU, where there is no flash attention kernel: the packed tokens are scattered into padded
[rows, heads, max_len, head_dim] tensors, attended by SDPA under key (and causal) masks, and gathered back. The CPU
path (tests, CI) thereby checks everything around the attention kernel against transformers without a GPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_padded(q, k, v, cu, max_len: int, causal: bool = False, window: int = 0,
                     scale: float | None = None):
    """Attention of q [T, heads, d] over k and v [T, kv_heads, d] (grouped where kv_heads < heads) within each
    text of the offsets `cu`. Tokens past the last offset (a graph bucket's padding) belong to no text and come out
    as zeros. `window`: only keys nearer than this to the query (Gemma 3's local layers); `scale`: the scores'
    scale where it is not 1/sqrt(d)."""
    t, heads, d = q.shape
    rows, real = cu.numel() - 1, int(cu[-1])
    seg = torch.searchsorted(cu[1:], torch.arange(real, device=q.device, dtype=cu.dtype), right=True).long()
    pos = torch.arange(real, device=q.device) - cu.long()[seg]

    def pad(x):
        out = x.new_zeros(rows, max_len, x.shape[1], d)
        out[seg, pos] = x[:real]
        return out.transpose(1, 2)

    lengths = cu[1:] - cu[:-1]
    keys = torch.arange(max_len, device=q.device)
    mask = (keys[None, :] < lengths[:, None])[:, None, None, :]
    if causal:
        mask = mask & (keys[None, :] <= keys[:, None])[None, None]
    if window:
        mask = mask & ((keys[None, :] - keys[:, None]).abs() < window)[None, None]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale,
                                         enable_gqa=k.shape[1] != heads)
    result = q.new_zeros(t, heads, d)
    result[:real] = out.transpose(1, 2)[seg, pos]
    return result
