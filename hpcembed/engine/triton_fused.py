"""The memory-bound pieces between the encoder's matmuls as Triton kernels: the embedding sum with its LayerNorm,
the residual add with LayerNorm, and mean pooling by sequence offsets.

These are the pieces torch.compile used to fuse (engine/varlen.py, fused_ops="compile"). The kernels are the same
fusion written out: each reads its inputs once and writes its output once, in fp32 inside. What they save is
start-up: Dynamo tracing and Inductor's compiling took 10-13 s of every encoder rank's start, cache warm or not
(bench/notes/feed_the_gpu.md), where a Triton kernel found in Triton's cache loads in milliseconds.

A LayerNorm row is one hidden vector (384 values for MiniLM): a program normalizes BLOCK_ROWS rows at once, the
hidden size padded to a power of two and masked. Mean pooling takes one text per program and walks its tokens
between two offsets, so it needs neither a token->row map nor atomics, and a CUDA-graph bucket's padding tokens
(past the last offset) are read by no one. Row counts are not specialized on (do_not_specialize), so batches of
every size share one compiled kernel.

On a machine without a GPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by the tests), on
CPU tensors, which is how CI checks them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Chosen on the H200 box (bench/fused_ops.py).
LN_BLOCK_ROWS, LN_WARPS = 8, 4
POOL_BLOCK_TOKENS, POOL_WARPS = 64, 4


@triton.jit
def _normalize_and_store(total, inside, offsets, cols, out, weight, bias, eps, HIDDEN: tl.constexpr):
    """LayerNorm of each row of `total` ([rows, BLOCK_H] fp32, zero where not `inside`), stored at `offsets`."""
    mean = tl.sum(total, 1) / HIDDEN
    centered = tl.where(inside, total - mean[:, None], 0.0)
    variance = tl.sum(centered * centered, 1) / HIDDEN
    scale = 1.0 / tl.sqrt(variance + eps)
    in_hidden = cols < HIDDEN
    w = tl.load(weight + cols, mask=in_hidden, other=0.0).to(tl.float32)
    b = tl.load(bias + cols, mask=in_hidden, other=0.0).to(tl.float32)
    normalized = centered * scale[:, None] * w[None, :] + b[None, :]
    tl.store(out + offsets, normalized.to(out.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["rows"])
def _add_layer_norm(x, residual, out, weight, bias, rows, eps,
                    HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    inside = (row[:, None] < rows) & (cols[None, :] < HIDDEN)
    offsets = row[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    total = (tl.load(x + offsets, mask=inside, other=0.0).to(tl.float32)
             + tl.load(residual + offsets, mask=inside, other=0.0).to(tl.float32))
    _normalize_and_store(total, inside, offsets, cols, out, weight, bias, eps, HIDDEN)


@triton.jit(do_not_specialize=["rows"])
def _embed_layer_norm(word, position, type_row, ids, positions, out, weight, bias, rows, eps,
                      HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    in_rows = row < rows
    in_hidden = cols < HIDDEN
    inside = in_rows[:, None] & in_hidden[None, :]
    token = tl.load(ids + row, mask=in_rows, other=0).to(tl.int64)
    place = tl.load(positions + row, mask=in_rows, other=0).to(tl.int64)
    total = (tl.load(word + token[:, None] * HIDDEN + cols[None, :], mask=inside, other=0.0).to(tl.float32)
             + tl.load(position + place[:, None] * HIDDEN + cols[None, :], mask=inside, other=0.0).to(tl.float32)
             + tl.load(type_row + cols, mask=in_hidden, other=0.0).to(tl.float32)[None, :])
    total = tl.where(inside, total, 0.0)
    offsets = row[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    _normalize_and_store(total, inside, offsets, cols, out, weight, bias, eps, HIDDEN)


@triton.jit(do_not_specialize=["skip"])
def _mean_pool(states, cu, out, skip, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr):
    text = tl.program_id(0)
    first = tl.load(cu + text) + skip
    end = tl.load(cu + text + 1)
    cols = tl.arange(0, BLOCK_H)
    in_hidden = cols < HIDDEN
    acc = tl.zeros([BLOCK_H], tl.float32)
    for start in range(first, end, BLOCK_T):
        token = start + tl.arange(0, BLOCK_T)
        inside = (token < end)[:, None] & in_hidden[None, :]
        block = tl.load(states + token[:, None].to(tl.int64) * HIDDEN + cols[None, :], mask=inside, other=0.0)
        acc += tl.sum(block.to(tl.float32), 0)
    count = tl.maximum(end - first, 1).to(tl.float32)
    tl.store(out + text.to(tl.int64) * HIDDEN + cols, acc / count, mask=in_hidden)


def _hidden_block(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension; x and residual [tokens, hidden], contiguous."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    if rows:
        _add_layer_norm[(triton.cdiv(rows, LN_BLOCK_ROWS),)](
            x.contiguous(), residual.contiguous(), out, weight, bias, rows, eps, HIDDEN=hidden,
            BLOCK_H=_hidden_block(hidden), BLOCK_ROWS=LN_BLOCK_ROWS, num_warps=LN_WARPS)
    return out


def embed(word: torch.Tensor, position: torch.Tensor, type_row: torch.Tensor, ids: torch.Tensor,
          positions: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(word[ids] + position[positions] + type_row): [tokens, hidden] in the weights' dtype."""
    rows, hidden = ids.shape[0], word.shape[1]
    out = torch.empty((rows, hidden), dtype=word.dtype, device=word.device)
    if rows:
        _embed_layer_norm[(triton.cdiv(rows, LN_BLOCK_ROWS),)](
            word, position, type_row, ids, positions, out, weight, bias, rows, eps, HIDDEN=hidden,
            BLOCK_H=_hidden_block(hidden), BLOCK_ROWS=LN_BLOCK_ROWS, num_warps=LN_WARPS)
    return out


def mean_pool(states: torch.Tensor, seg: torch.Tensor, cu: torch.Tensor, skip: int = 0,
              within: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's mean token state, leaving out its first `skip` tokens, as float32 [rows, hidden]; `cu`: int32
    row offsets into states [tokens, hidden]. (`seg` and `within` are the eager version's; offsets suffice here.)"""
    rows, hidden = cu.shape[0] - 1, states.shape[1]
    out = torch.empty((rows, hidden), dtype=torch.float32, device=states.device)
    if rows:
        _mean_pool[(rows,)](states.contiguous(), cu, out, skip, HIDDEN=hidden, BLOCK_H=_hidden_block(hidden),
                            BLOCK_T=POOL_BLOCK_TOKENS, num_warps=POOL_WARPS)
    return out


# -- the decoder path's pieces (engine/decoder.py) ---------------------------------------------------------------

@triton.jit
def _store_rows(out, scales, y, offsets, row, rows, inside, QUANT: tl.constexpr, FP8_MAX: tl.constexpr):
    """Store rows of y [rows, cols] as they are, or (QUANT) as e4m3 with one scale per row (engine/fp8.py)."""
    if QUANT:
        yf = tl.where(inside, y.to(tl.float32), 0.0)
        scale = tl.maximum(tl.max(tl.abs(yf), 1), 1e-12) / FP8_MAX
        q = tl.minimum(tl.maximum(yf / scale[:, None], -FP8_MAX), FP8_MAX)
        tl.store(out + offsets, q.to(out.dtype.element_ty), mask=inside)
        tl.store(scales + row, scale, mask=row < rows)
    else:
        tl.store(out + offsets, y, mask=inside)


@triton.jit(do_not_specialize=["rows"])
def _rms_norm(x, residual, out, total_out, scales, weight, rows, eps, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_ROWS: tl.constexpr, ADD: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr):
    """RMSNorm of x (+ residual, stored to total_out where ADD) as transformers computes it: normalized in fp32,
    rounded to the input dtype, then scaled by the weight; stored as it is or quantized for an FP8 matmul."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    inside = (row[:, None] < rows) & (cols[None, :] < HIDDEN)
    offsets = row[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    total = tl.load(x + offsets, mask=inside, other=0.0)
    if ADD:
        total = total + tl.load(residual + offsets, mask=inside, other=0.0)
        tl.store(total_out + offsets, total, mask=inside)
    h = total.to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(h * h, 1) / HIDDEN + eps)
    w = tl.load(weight + cols, mask=cols < HIDDEN, other=0.0)
    normalized = (h * scale[:, None]).to(total.dtype)
    _store_rows(out, scales, w[None, :] * normalized, offsets, row, rows, inside, QUANT, FP8_MAX)


@triton.jit(do_not_specialize=["tokens"])
def _silu_mul(gate_up, out, scales, tokens, INTER: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
              FP8_MAX: tl.constexpr):
    """silu(gate) * up for one token's whole row (QUANT: stored in e4m3 with the row's scale), or one BLOCK of it."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < INTER
    row = token.to(tl.int64) * 2 * INTER
    gate = tl.load(gate_up + row + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row + INTER + cols, mask=inside, other=0.0)
    y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
    _store_rows(out, scales, y[None, :], token.to(tl.int64) * INTER + cols[None, :], token + tl.zeros([1], tl.int32),
                tokens, inside[None, :], QUANT, FP8_MAX)


@triton.jit(do_not_specialize=["rows"])
def _quantize_rows(x, out, scales, rows, COLS: tl.constexpr, BLOCK_C: tl.constexpr, FP8_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < COLS
    v = tl.load(x + row * COLS + cols, mask=inside, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(v), 0), 1e-12) / FP8_MAX
    q = tl.minimum(tl.maximum(v / scale, -FP8_MAX), FP8_MAX)
    tl.store(out + row * COLS + cols, q.to(out.dtype.element_ty), mask=inside)
    tl.store(scales + row, scale)


FP8_MAX = 448.0
SILU_BLOCK = 1024


def _quantized_out(shape, like: torch.Tensor, quantize: bool):
    """The output (and per-row scales, a dummy where not quantizing) of a kernel that may store e4m3."""
    if not quantize:
        return torch.empty(shape, dtype=like.dtype, device=like.device), like
    return (torch.empty(shape, dtype=torch.float8_e4m3fn, device=like.device),
            torch.empty((shape[0], 1), dtype=torch.float32, device=like.device))


def _rms_launch(x, residual, weight, eps, add: bool, quantize: bool = False):
    hidden = x.shape[-1]
    flat = x.reshape(-1, hidden)
    rows = flat.shape[0]
    out, scales = _quantized_out(flat.shape, flat, quantize)
    total = torch.empty_like(flat) if add else flat
    if rows:
        _rms_norm[(triton.cdiv(rows, LN_BLOCK_ROWS),)](
            flat, residual.reshape(-1, hidden) if add else flat, out, total, scales, weight, rows, eps, HIDDEN=hidden,
            BLOCK_H=_hidden_block(hidden), BLOCK_ROWS=LN_BLOCK_ROWS, ADD=add, QUANT=quantize, FP8_MAX=FP8_MAX,
            num_warps=LN_WARPS)
    normed = (out, scales) if quantize else out.view(x.shape)
    return normed, total.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """RMSNorm over the last dimension of x (contiguous: [tokens, hidden] or [tokens, heads, head_dim]);
    `quantize`: as (e4m3 values, per-row scales) for an FP8 matmul, x being [tokens, hidden]."""
    return _rms_launch(x.contiguous(), None, weight, eps, add=False, quantize=quantize)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quantize: bool = False):
    """(RMSNorm(x + residual), x + residual) in one pass; the first quantized where `quantize`, as rms_norm's."""
    return _rms_launch(x.contiguous(), residual.contiguous(), weight, eps, add=True, quantize=quantize)


def silu_mul(gate_up: torch.Tensor, quantize: bool = False):
    """silu(gate) * up for the fused [tokens, 2 * inter] projection, gate first; `quantize` as rms_norm's (one
    program then takes a whole row, for its scale)."""
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out, scales = _quantized_out((tokens, inter), gate_up, quantize)
    if tokens:
        block = triton.next_power_of_2(inter) if quantize else SILU_BLOCK
        _silu_mul[(tokens, triton.cdiv(inter, block))](gate_up.contiguous(), out, scales, tokens, INTER=inter,
                                                       BLOCK=block, QUANT=quantize, FP8_MAX=FP8_MAX,
                                                       num_warps=8 if quantize else 4)
    return (out, scales) if quantize else out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale in e4m3, scale [rows, 1] fp32) with one scale per row: engine/fp8.py's quantize_rows_eager."""
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows[(rows,)](x.contiguous(), out, scales, rows, COLS=cols, BLOCK_C=triton.next_power_of_2(cols),
                                FP8_MAX=FP8_MAX, num_warps=8)
    return out, scales


@triton.jit(do_not_specialize=["tokens"])
def _qk_norm_rotary(qkv, positions, inv_freq, q_weight, k_weight, q_out, k_out, tokens, eps, HEADS: tl.constexpr,
                    KV_HEADS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, NORM: tl.constexpr):
    """One head of BLOCK_T tokens, read from the fused projection's output: RMSNorm over the head (Qwen3's q/k
    norms, where NORM), then rotated by the token's position (the rotate-half layout), stored to q_out or k_out."""
    head = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = (t < tokens)[:, None]
    half = tl.arange(0, D // 2)
    base = qkv + t[:, None].to(tl.int64) * ((HEADS + 2 * KV_HEADS) * D) + head * D + half[None, :]
    x1 = tl.load(base, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(base + D // 2, mask=inside, other=0.0).to(tl.float32)
    if NORM:
        scale = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)
        if head < HEADS:
            w1, w2 = tl.load(q_weight + half).to(tl.float32), tl.load(q_weight + D // 2 + half).to(tl.float32)
        else:
            w1, w2 = tl.load(k_weight + half).to(tl.float32), tl.load(k_weight + D // 2 + half).to(tl.float32)
        x1 = x1 * scale[:, None] * w1[None, :]
        x2 = x2 * scale[:, None] * w2[None, :]
    angle = tl.load(positions + t, mask=t < tokens, other=0).to(tl.float32)[:, None] * tl.load(inv_freq + half)[None, :]
    cos, sin = tl.cos(angle), tl.sin(angle)
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if head < HEADS:
        dest = q_out + t[:, None].to(tl.int64) * (HEADS * D) + head * D + half[None, :]
    else:
        dest = k_out + t[:, None].to(tl.int64) * (KV_HEADS * D) + (head - HEADS) * D + half[None, :]
    tl.store(dest, out1.to(q_out.dtype.element_ty), mask=inside)
    tl.store(dest + D // 2, out2.to(q_out.dtype.element_ty), mask=inside)


ROTARY_BLOCK_TOKENS = 16


def qk_norm_rotary(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, q_weight, k_weight,
                   eps: float, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, heads, d], k [T, kv_heads, d]) from the fused Q/K/V projection [T, (heads + 2 kv_heads) d] in one
    pass: each head RMS-normalized where weights are given (Qwen3), then rotated; engine/decoder.py's eager
    rms_norm and apply_rotary, with cos and sin computed in fp32 and rounded once."""
    tokens = qkv.shape[0]
    q = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((tokens, kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        norm = q_weight is not None
        _qk_norm_rotary[(triton.cdiv(tokens, ROTARY_BLOCK_TOKENS), heads + kv_heads)](
            qkv.contiguous(), positions, inv_freq, q_weight if norm else inv_freq, k_weight if norm else inv_freq,
            q, k, tokens, eps, HEADS=heads, KV_HEADS=kv_heads, D=head_dim, BLOCK_T=ROTARY_BLOCK_TOKENS, NORM=norm,
            num_warps=4)
    return q, k
