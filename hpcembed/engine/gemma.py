"""Gemma 3 text models on the padding-free decoder path: EmbeddingGemma (bidirectional, mean pooling, Dense modules
after it: engine/dense.py) and Gemma 3's causal decoders.

Where Gemma 3 differs from the Llama family (engine/decoder.py), each as transformers' Gemma3TextModel computes it:
- the token embeddings are multiplied by sqrt(hidden), that factor first rounded to the weights' dtype;
- RMSNorm scales by (1 + weight) in fp32 and casts after (Llama casts, then scales), and a layer has four: before
  and after attention, before and after the MLP, each block's output normalized before it joins the residual;
- the MLP is GELU (tanh approximation) of the gate times the up projection;
- local layers ("sliding_attention") attend only to keys nearer than `sliding_window` (when the model is
  bidirectional, `use_bidirectional_attention`, to keys within half of it on either side), global layers to all;
  each kind has its own rotary base;
- scores are scaled by query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5.

The pieces between matmuls run eagerly or compiled by torch.compile; the Triton kernels of engine/triton_fused.py
are the Llama family's, so --fused-ops triton takes the compiled ones here. Attention is flash attention on the GPU
(its windows), padded SDPA on CPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoder import (DecoderShape, Linear, WeightReader, _maybe_quantized, compiled, rotary,
                      rotary_frequencies, split_heads)

TYPES = ("gemma3_text",)             # config.json's model_type
LAYER_KINDS = ("sliding_attention", "full_attention")
ROPE_TYPES = ("default", "linear")


def layer_types(config: dict) -> list[str]:
    """Each layer's kind: config.json's layer_types, or every n-th layer global (sliding_window_pattern)."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    every = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
            for i in range(int(config["num_hidden_layers"]))]


def rope_of(config: dict, kind: str) -> tuple[str, float, float]:
    """(type, theta, factor) of a layer kind's rotary embedding: from transformers 5's rope_parameters per layer
    kind, or the older rope_theta and rope_scaling (global layers) and rope_local_base_freq (local ones)."""
    params = (config.get("rope_parameters") or {}).get(kind)
    if params:
        return params.get("rope_type", "default"), float(params["rope_theta"]), float(params.get("factor", 1.0))
    if kind == "sliding_attention":
        return "default", float(config.get("rope_local_base_freq", 10000.0)), 1.0
    scaling = config.get("rope_scaling") or {}
    return (scaling.get("rope_type") or scaling.get("type") or "default", float(config.get("rope_theta", 1e6)),
            float(scaling.get("factor", 1.0)))


def supports(config: dict) -> str | None:
    """None when this path computes the Gemma 3 model of `config`, else why not."""
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        return f"activation {activation!r} (the Gemma 3 path's MLP is GELU, tanh approximation)"
    if config.get("attn_logit_softcapping"):
        return "attention logit soft-capping"
    kinds = layer_types(config)
    if set(kinds) - set(LAYER_KINDS):
        return f"layer kinds {sorted(set(kinds) - set(LAYER_KINDS))} (the Gemma 3 path has {', '.join(LAYER_KINDS)})"
    for kind in set(kinds):
        rope_type = rope_of(config, kind)[0]
        if rope_type not in ROPE_TYPES:
            return f"rotary embedding type {rope_type!r} on {kind} layers (the Gemma 3 path has default and linear)"
    return None


@dataclass
class GemmaLayer:
    in_norm: torch.Tensor       # norms hold 1 + weight, in fp32
    qkv: object                 # a decoder.Linear or an Fp8Linear (engine/fp8.py)
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    out: object
    post_attention_norm: torch.Tensor
    pre_mlp_norm: torch.Tensor
    gate_up: object
    down: object
    post_mlp_norm: torch.Tensor
    inv_freq: torch.Tensor      # this layer kind's rotary frequencies
    window: int                 # keys nearer than this only; 0 for a global layer


class GemmaWeights(DecoderShape):
    """A Gemma 3 text model's weights, Q/K/V and gate/up fused."""

    takes_triton_attention = False      # windows and its own scale: flash attention takes them

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device, linear=Linear):
        config = self._read_shape(model_dir)
        self.causal = not config.get("use_bidirectional_attention", False)
        scalar = float(config.get("query_pre_attn_scalar") or self.head_dim)
        self.scale = None if scalar == self.head_dim else scalar ** -0.5
        self.embed_scale = torch.tensor(self.hidden ** 0.5).to(device=device, dtype=dtype)
        window = int(config.get("sliding_window") or 0)
        if window and not self.causal:
            # config.json's window spans both sides; transformers keeps keys within half of it either way.
            window = window // 2 + 1
        frequencies = {}
        for kind in LAYER_KINDS:
            _, theta, factor = rope_of(config, kind)
            frequencies[kind] = rotary_frequencies(self.head_dim, theta, device, factor)
        reader = WeightReader(model_dir, dtype, device, linear)
        get, fused = reader.get, reader.fused

        def norm(name: str) -> torch.Tensor:
            return 1.0 + get(name).float()

        self.embed = get("embed_tokens.weight")
        self.norm = norm("norm.weight")
        self.layers = []
        for i, kind in enumerate(layer_types(config)):
            p = f"layers.{i}."
            att = p + "self_attn."
            self.layers.append(GemmaLayer(
                in_norm=norm(p + "input_layernorm.weight"),
                qkv=fused([att + "q_proj", att + "k_proj", att + "v_proj"]),
                q_norm=norm(att + "q_norm.weight"), k_norm=norm(att + "k_norm.weight"),
                out=fused([att + "o_proj"]), post_attention_norm=norm(p + "post_attention_layernorm.weight"),
                pre_mlp_norm=norm(p + "pre_feedforward_layernorm.weight"),
                gate_up=fused([p + "mlp.gate_proj", p + "mlp.up_proj"]), down=fused([p + "mlp.down_proj"]),
                post_mlp_norm=norm(p + "post_feedforward_layernorm.weight"), inv_freq=frequencies[kind],
                window=window if kind == "sliding_attention" else 0))
            reader.drop(p)              # the host copy of each layer goes as soon as it is on the device

    def forward(self, ids, positions, cu, max_len: int, attention, ops) -> torch.Tensor:
        """Token states [T, hidden] after the final norm. A block's output norm, the residual add and the next
        block's input norm are one op (`add_norms`), so the residual is read and written once between blocks."""
        eps, heads, kv_heads, d = self.eps, self.heads, self.kv_heads, self.head_dim
        x = self.embed[ids] * self.embed_scale
        first = self.layers[0]
        h = ops.rms_norm(x, first.in_norm, eps, first.qkv.takes_fp8)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(h)
            q, k = ops.qk_norm_rotary(qkv, positions, layer.inv_freq, layer.q_norm, layer.k_norm, eps, heads,
                                       kv_heads, d)
            v = qkv[:, (heads + kv_heads) * d:].view(-1, kv_heads, d)
            # A window no text of the batch outgrows masks nothing, and flash attention runs faster without one.
            window = layer.window if max_len > layer.window else 0
            att = attention(q, k, v, cu, max_len, self.causal, window, self.scale)
            h, x = ops.add_norms(layer.out(att.reshape(-1, heads * d)), x, layer.post_attention_norm,
                                 layer.pre_mlp_norm, eps, layer.gate_up.takes_fp8)
            h = layer.down(ops.gelu_mul(layer.gate_up(h), layer.down.takes_fp8))
            after = self.layers[i + 1] if i + 1 < len(self.layers) else None
            h, x = ops.add_norms(h, x, layer.post_mlp_norm, after.in_norm if after else self.norm, eps,
                                 bool(after) and after.qkv.takes_fp8)
        return h

    @staticmethod
    def ops_for(fused_ops: str) -> type:
        return GemmaOps if fused_ops == "eager" else _compiled_ops()


# -- the pieces between matmuls ------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, quantize: bool = False):
    """Gemma's RMSNorm: normalized and scaled (`scale` = 1 + weight) in fp32, then cast to x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return _maybe_quantized((h * scale).to(x.dtype), quantize)


def add_norms(h: torch.Tensor, x: torch.Tensor, out_scale: torch.Tensor, in_scale: torch.Tensor, eps: float,
              quantize: bool = False):
    """(the next block's normalized input, the new residual): a block's output h normalized and added to the
    residual x, then normalized for the next block, as transformers does it in three steps."""
    total = x + rms_norm(h, out_scale, eps)
    return rms_norm(total, in_scale, eps, quantize), total


def gelu_mul(gate_up: torch.Tensor, quantize: bool = False):
    """GELU (tanh) of the gate times up, from the fused [T, 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return _maybe_quantized(F.gelu(gate, approximate="tanh") * up, quantize)


def qk_norm_rotary(qkv, positions, inv_freq, q_scale, k_scale, eps: float, heads: int, kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, heads, d], k [T, kv_heads, d]): each head Gemma-RMS-normalized, then rotated by its position."""
    q, k = split_heads(qkv, heads, kv_heads, head_dim)
    return rotary(rms_norm(q, q_scale, eps), rms_norm(k, k_scale, eps), positions, inv_freq)


class GemmaOps:
    rms_norm = staticmethod(rms_norm)
    add_norms = staticmethod(add_norms)
    gelu_mul = staticmethod(gelu_mul)
    qk_norm_rotary = staticmethod(qk_norm_rotary)


@functools.cache
def _compiled_ops() -> type[GemmaOps]:
    return compiled(GemmaOps)
