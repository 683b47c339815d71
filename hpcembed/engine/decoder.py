"""The padding-free path for LLM-based embedders: Llama, Mistral, Qwen2 and Qwen3 decoders.

The same packed layout as the BERT path (flat token ids, cumulative sequence offsets; engine/varlen.py runs both):
per layer RMSNorm, one fused Q/K/V projection, Qwen3's per-head q/k RMSNorm, rotary embeddings by each token's
place in its own text, grouped-query attention over the offsets (causal, or bidirectional where config.json says
`is_causal: false`, as transformers reads it), then a SwiGLU MLP with gate and up fused into one matmul. The final
norm's states go to the pooling the model's sentence-transformers config names (last token for Qwen3-Embedding and
e5-mistral: the tokenizer's template appends the end-of-sequence token, so the last token is that one).

Positions restart at 0 in every text. A padded transformers batch numbers them differently (from the left pad
when the tokenizer pads left), which does not change the result: rotary attention depends on distances only.

FP8 (engine/fp8.py) swaps the four matmuls of each layer for e4m3 ones; embeddings, norms, attention and pooling
stay in bf16.

Gemma 3 (engine/gemma.py) shares this module's weight reading, rotary embeddings and attention kernels, and has
its own layer and norms.
"""
from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .model import ModelSpec

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def config_of(spec_or_path) -> dict:
    path = spec_or_path.path if isinstance(spec_or_path, ModelSpec) else spec_or_path
    return json.loads((Path(path) / "config.json").read_text())


def _rope(config: dict) -> tuple[str, float]:
    """(rope type, theta), from transformers 5's rope_parameters or the older rope_theta and rope_scaling."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return kind, float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def is_decoder(spec: ModelSpec) -> bool:
    return config_of(spec).get("model_type") in SUPPORTED


def supports(spec: ModelSpec) -> str | None:
    """None when the padding-free decoder path serves this model, else why not."""
    config = config_of(spec)
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the decoder path serves {', '.join(SUPPORTED)})"
    if not sorted(Path(spec.path).glob("*.safetensors")):
        return "no .safetensors weights"
    if kind == "gemma3_text":
        return None             # the rest is engine/gemma.py's to say (varlen.supports asks it)
    rope_type, _ = _rope(config)
    if rope_type != "default":
        return f"rotary embedding type {rope_type!r} (the decoder path computes the default one)"
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embeddings"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config['hidden_act']!r} (the decoder path's MLP is SwiGLU)"
    window = config.get("sliding_window")
    if window and (config.get("use_sliding_window", kind == "mistral")) and window < spec.max_seq_length:
        return f"a sliding attention window ({window}) shorter than max_seq_length {spec.max_seq_length}"
    return None



@dataclass
class DecoderLayer:
    in_norm: torch.Tensor
    qkv: object                 # a Linear (below) or an Fp8Linear (engine/fp8.py): x -> x @ W.T + b
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    out: object
    post_norm: torch.Tensor
    gate_up: object
    down: object


class Linear:
    """x @ W.T (+ b) in the weights' dtype."""
    takes_fp8 = False           # its input is a tensor, not FP8 values and scales (engine/fp8.py)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class WeightReader:
    """A decoder's tensors from its .safetensors files (one or sharded), `model.` prefixes dropped, each moved to
    the device and dtype as it is asked for."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device, linear=Linear):
        from safetensors.torch import load_file
        self.model_dir, self.dtype, self.device, self.linear = model_dir, dtype, device, linear
        raw: dict[str, torch.Tensor] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            raw.update(load_file(str(path)))
        self.raw = {k[len("model."):] if k.startswith("model.") else k: v for k, v in raw.items()}

    def has(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.raw:
            raise ConfigError(f"model {self.model_dir}: weight {name!r} missing from its .safetensors files")
        return self.raw[name].to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def fused(self, names: list[str]):
        """One matmul (`linear`) for the projections `names`, their weights (and biases, zeros where one has
        none) stacked."""
        weight = torch.cat([self.get(n + ".weight") for n in names])
        biases = [self.raw.get(n + ".bias") for n in names]
        if all(b is None for b in biases):
            return self.linear(weight, None)
        bias = torch.cat([self.get(n + ".bias") if b is not None else
                          torch.zeros(self.raw[n + ".weight"].shape[0], dtype=self.dtype, device=self.device)
                          for n, b in zip(names, biases)])
        return self.linear(weight, bias)

    def drop(self, prefix: str) -> None:
        """Free the host copies of every tensor under `prefix` (a layer, once it is on the device)."""
        for key in [k for k in self.raw if k.startswith(prefix)]:
            del self.raw[key]


def rotary_frequencies(head_dim: int, theta: float, device, factor: float = 1.0) -> torch.Tensor:
    """Rotary frequencies as transformers computes them (default type; `factor` divides them, linear type)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)) \
        / factor


class DecoderShape:
    """What every decoder's weights hold of config.json: its heads, widths, norm epsilon and positions."""

    position_offset = 0

    def _read_shape(self, model_dir: str) -> dict:
        config = self.config = config_of(model_dir)
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.hidden = int(config["hidden_size"])
        self.head_dim = int(config.get("head_dim") or self.hidden // self.heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.max_positions = int(config.get("max_position_embeddings", 32768))
        return config


class DecoderWeights(DecoderShape):
    """A Llama-family decoder's weights, with Q/K/V and gate/up fused."""

    takes_triton_attention = True   # every layer attends plainly: no window, the default scale

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device, linear=Linear):
        """`linear(weight, bias)`: how each fused matmul is held (Linear, or engine/fp8.py's quantizing one)."""
        config = self._read_shape(model_dir)
        self.causal = bool(config.get("is_causal", True))
        self.inv_freq = rotary_frequencies(self.head_dim, _rope(config)[1], device)
        reader = WeightReader(model_dir, dtype, device, linear)
        get, fused = reader.get, reader.fused
        self.embed = get("embed_tokens.weight")
        self.norm = get("norm.weight")
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"layers.{i}."
            att = p + "self_attn."
            qk_norm = reader.has(att + "q_norm.weight")
            self.layers.append(DecoderLayer(
                in_norm=get(p + "input_layernorm.weight"),
                qkv=fused([att + "q_proj", att + "k_proj", att + "v_proj"]),
                q_norm=get(att + "q_norm.weight") if qk_norm else None,
                k_norm=get(att + "k_norm.weight") if qk_norm else None,
                out=fused([att + "o_proj"]), post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=fused([p + "mlp.gate_proj", p + "mlp.up_proj"]), down=fused([p + "mlp.down_proj"])))
            reader.drop(p)              # the host copy of each layer goes as soon as it is on the device

    def forward(self, ids, positions, cu, max_len: int, attention, ops) -> torch.Tensor:
        return decoder_forward(self, ids, positions, cu, max_len, attention, ops)

    @staticmethod
    def ops_for(fused_ops: str):
        return ops_for(fused_ops)


# -- the pieces between matmuls, eager ----------------------------------------------------------------------------

def _maybe_quantized(y: torch.Tensor, quantize: bool):
    """y, or (quantize) y as an FP8 matmul takes its input: e4m3 values and per-row scales (engine/fp8.py)."""
    if not quantize:
        return y
    from .fp8 import quantize_rows_eager
    return quantize_rows_eager(y)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """transformers' RMSNorm: normalized in fp32, cast back, then scaled by the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return _maybe_quantized(weight * h.to(x.dtype), quantize)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """(RMSNorm(x + residual), x + residual): the normalized input of the next block and the new residual."""
    total = x + residual
    return rms_norm(total, weight, eps, quantize), total


def silu_mul(gate_up: torch.Tensor, quantize: bool = False):
    """SwiGLU's silu(gate) * up, from the fused [T, 2 * intermediate] projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return _maybe_quantized(F.silu(gate) * up, quantize)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by each token's cos and sin [T, head_dim] (the rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rotary(q: torch.Tensor, k: torch.Tensor, positions, inv_freq) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by each token's position, cos and sin computed as transformers computes them (fp32 angles,
    rounded to the activations' dtype)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def split_heads(qkv, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, heads, d], k [T, kv_heads, d]) from the fused projection."""
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    return q.reshape(-1, heads, head_dim), k.reshape(-1, kv_heads, head_dim)


def qk_norm_rotary(qkv, positions, inv_freq, q_weight, k_weight, eps: float, heads: int, kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, heads, d], k [T, kv_heads, d]) from the fused projection: each head RMS-normalized where weights are
    given (Qwen3's q/k norms), then rotated by the token's position."""
    q, k = split_heads(qkv, heads, kv_heads, head_dim)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return rotary(q, k, positions, inv_freq)


class DecoderOps:
    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    silu_mul = staticmethod(silu_mul)
    qk_norm_rotary = staticmethod(qk_norm_rotary)


# -- attention ----------------------------------------------------------------------------------------------------

@functools.cache
def _varlen_attn():
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def attention_flash(q, k, v, cu, max_len: int, causal: bool, window: int = 0, scale: float | None = None):
    """torch's varlen flash attention. Grouped K/V go in as they are: the flash kernel shares each K/V head among
    its group of query heads (torch 2.11 passes them through, identical to repeating them on the H200 box, and
    repeating cost 12% of the 0.6B stage: bench/notes/llm_stage.md); later torch asks for enable_gqa. Causality
    is a (-1, 0) window from torch 2.11 on, is_causal before. `window`: keys nearer than this to the query only
    (Gemma 3's local layers), `scale`: the scores' scale where it is not 1/sqrt(head_dim)."""
    varlen_attn, params = _varlen_attn()
    kwargs = {}
    if window:
        if "window_size" not in params:
            raise ConfigError("this torch's varlen attention takes no window; Gemma 3's local layers need one")
        kwargs.update(window_size=(window - 1, 0 if causal else window - 1))
    elif causal:
        kwargs.update(window_size=(-1, 0)) if "window_size" in params else kwargs.update(is_causal=True)
    if scale is not None:
        kwargs["scale"] = scale
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def attention_triton(q, k, v, cu, max_len: int, causal: bool):
    """hpcembed's Triton kernel for grouped heads (engine/triton_attention.py): each group's K/V read once. Plain
    attention only: attention_kernels.py gives it weights whose `takes_triton_attention` alone."""
    from .triton_attention import grouped_attention
    return grouped_attention(q, k, v, cu, max_len, causal)


def decoder_forward(w: DecoderWeights, ids, positions, cu, max_len: int, attention, ops=DecoderOps) -> torch.Tensor:
    """Token states [T, hidden] after the final norm, for flat ids [T] at `positions` (0 at each text's start)."""
    eps, heads, kv_heads, d = w.eps, w.heads, w.kv_heads, w.head_dim
    x = w.embed[ids]
    residual = None
    # An FP8 matmul's input is quantized by the op that produces it, in the same pass, where that op is a norm or
    # SwiGLU: 3 of the 4 quantizations in a layer (not the attention output's).
    for layer in w.layers:
        if residual is None:
            h, residual = ops.rms_norm(x, layer.in_norm, eps, layer.qkv.takes_fp8), x
        else:
            h, residual = ops.add_rms_norm(x, residual, layer.in_norm, eps, layer.qkv.takes_fp8)
        qkv = layer.qkv(h)
        q, k = ops.qk_norm_rotary(qkv, positions, w.inv_freq, layer.q_norm, layer.k_norm, eps, heads, kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d:].view(-1, kv_heads, d)
        att = attention(q, k, v, cu, max_len, w.causal)
        h, residual = ops.add_rms_norm(layer.out(att.reshape(-1, heads * d)), residual, layer.post_norm, eps,
                                       layer.gate_up.takes_fp8)
        x = layer.down(ops.silu_mul(layer.gate_up(h), layer.down.takes_fp8))
    return ops.add_rms_norm(x, residual, w.norm, eps)[0]


def ops_for(fused_ops: str) -> type[DecoderOps]:
    """The decoder's pieces between matmuls for --fused-ops (already checked by the caller): eager, compiled by
    torch.compile, or hpcembed's Triton kernels (engine/triton_fused.py)."""
    if fused_ops == "eager":
        return DecoderOps
    return _compiled_ops() if fused_ops == "compile" else _triton_ops()


@functools.cache
def _triton_ops() -> type[DecoderOps]:
    from . import triton_fused

    class _Triton(DecoderOps):
        rms_norm = staticmethod(triton_fused.rms_norm)
        add_rms_norm = staticmethod(triton_fused.add_rms_norm)
        silu_mul = staticmethod(triton_fused.silu_mul)
        qk_norm_rotary = staticmethod(triton_fused.qk_norm_rotary)
    return _Triton


@functools.cache
def _compiled_ops() -> type[DecoderOps]:
    return compiled(DecoderOps)


def compiled(ops: type) -> type:
    """`ops` with each of its pieces compiled by torch.compile (callers cache the class, so a process compiles
    each piece once, whatever its instances)."""
    pieces = {name: staticmethod(torch.compile(getattr(ops, name)))
              for name, value in vars(ops).items() if isinstance(value, staticmethod)}
    return type(f"Compiled{ops.__name__}", (ops,), pieces)
