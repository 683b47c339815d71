"""Varlen attention in Triton: for small heads (MiniLM's 32 dimensions), the GPU fast path's attention kernel,
and for decoders' grouped heads (`grouped_attention`, below).

Flash attention's varlen kernel tiles 128 queries by 128 keys whatever the head size; at head_dim 32 a tile's
matmuls are short, and a text of 150 tokens fills a 2x2 grid of those tiles to 35%. Here a program takes one
text, one head and BLOCK_M of its queries, and walks its keys BLOCK_N at a time with the online softmax: smaller
tiles waste less of a short text, and a text's keys and values (256 x 32 fp16 = 16 KB each at most) stay in L2
for all of its query blocks. Scores accumulate in fp32 and are scaled in fp32, as flash attention does; only the
probabilities are rounded to fp16/bf16 for the second matmul.

It reads Q, K and V straight from the fused projection's output [tokens, 3, heads, head_dim] and writes
[tokens, heads, head_dim], so no copy sits on either side. Tokens past the last offset (a graph bucket's padding)
belong to no text and are not written. bench/notes/gpu_stage.md has the measurements.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The fastest of the shapes tried on the H200 box (bench/attention.py, bench/notes/gpu_stage.md): 64 queries, two
# heads per program.
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, HEAD_PAIRS = 64, 32, 4, 3, True


@triton.jit
def _key_block(q, acc, running_max, running_sum, k_base, v_base, key_start, length, stride_token, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One block of keys through the online softmax; MASKED only for a text's last, partial block."""
    key_rows = key_start + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    offsets = key_rows[:, None] * stride_token + cols[None, :]
    if MASKED:
        inside = key_rows < length
        k = tl.load(k_base + offsets, mask=inside[:, None], other=0.0)
        v = tl.load(v_base + offsets, mask=inside[:, None], other=0.0)
    else:
        k = tl.load(k_base + offsets)
        v = tl.load(v_base + offsets)
    raw = tl.dot(q, tl.trans(k))
    if MASKED:
        raw = tl.where(inside[None, :], raw, float("-inf"))
    return _softmax_step(raw, v, acc, running_max, running_sum, qk_scale)


@triton.jit
def _softmax_step(raw, v, acc, running_max, running_sum, qk_scale):
    """A block of unscaled scores (-inf where masked) and its values through the online softmax. The scale rides
    in one fused multiply-add with the max (qk_scale > 0, so the max of the scaled scores is the scaled max)."""
    new_max = tl.maximum(running_max, tl.max(raw, 1) * qk_scale)
    p = tl.math.exp2(raw * qk_scale - new_max[:, None])
    correction = tl.math.exp2(running_max - new_max)
    running_sum = running_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, new_max, running_sum


@triton.jit
def _varlen_forward(qkv, out, cu, stride_token, out_stride_token, qk_scale,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAIR: tl.constexpr = False):
    """PAIR: a program takes two neighbouring heads through the same loop over keys (two independent chains of
    dependent steps for the scheduler to interleave; the grid then has half the heads)."""
    text = tl.program_id(0)
    block = tl.program_id(1)
    head = tl.program_id(2) * (2 if PAIR else 1)
    start = tl.load(cu + text)
    length = tl.load(cu + text + 1) - start
    first = block * BLOCK_M
    if first >= length:
        return
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    base = qkv + start.to(tl.int64) * stride_token + head * HEAD_DIM
    q_offsets = rows[:, None] * stride_token + cols[None, :]
    q = tl.load(base + q_offsets, mask=rows[:, None] < length, other=0.0)
    k_base = base + HEADS * HEAD_DIM
    v_base = base + 2 * HEADS * HEAD_DIM
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if PAIR:
        q2 = tl.load(base + HEAD_DIM + q_offsets, mask=rows[:, None] < length, other=0.0)
        running_max2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum2 = tl.zeros([BLOCK_M], tl.float32)
        acc2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    whole = length - length % BLOCK_N
    for key_start in range(0, whole, BLOCK_N):
        acc, running_max, running_sum = _key_block(q, acc, running_max, running_sum, k_base, v_base, key_start,
                                                   length, stride_token, qk_scale, HEAD_DIM, BLOCK_N, False)
        if PAIR:
            acc2, running_max2, running_sum2 = _key_block(q2, acc2, running_max2, running_sum2, k_base + HEAD_DIM,
                                                          v_base + HEAD_DIM, key_start, length, stride_token,
                                                          qk_scale, HEAD_DIM, BLOCK_N, False)
    if whole < length:
        acc, running_max, running_sum = _key_block(q, acc, running_max, running_sum, k_base, v_base, whole,
                                                   length, stride_token, qk_scale, HEAD_DIM, BLOCK_N, True)
        if PAIR:
            acc2, running_max2, running_sum2 = _key_block(q2, acc2, running_max2, running_sum2, k_base + HEAD_DIM,
                                                          v_base + HEAD_DIM, whole, length, stride_token,
                                                          qk_scale, HEAD_DIM, BLOCK_N, True)
    target = out + start.to(tl.int64) * out_stride_token + head * HEAD_DIM
    out_offsets = rows[:, None] * out_stride_token + cols[None, :]
    tl.store(target + out_offsets, (acc / running_sum[:, None]).to(out.dtype.element_ty),
             mask=rows[:, None] < length)
    if PAIR:
        tl.store(target + HEAD_DIM + out_offsets, (acc2 / running_sum2[:, None]).to(out.dtype.element_ty),
                 mask=rows[:, None] < length)


def supported(head_dim: int) -> bool:
    """tl.dot needs a power of two of at least 16 on the reduced dimension."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def varlen_attention(qkv: torch.Tensor, cu: torch.Tensor, max_len: int, head_pairs: bool = HEAD_PAIRS) -> torch.Tensor:
    """Bidirectional attention of each text (rows of `cu`, int32 offsets) over itself. `qkv`: [tokens, 3, heads,
    head_dim], contiguous. Returns [tokens, heads, head_dim]; rows past cu[-1] are left unwritten. `head_pairs`:
    two heads per program (for an even number of heads)."""
    tokens, _, heads, head_dim = qkv.shape
    out = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    texts = cu.numel() - 1
    if texts == 0 or max_len == 0:
        return out
    pair = head_pairs and heads % 2 == 0
    grid = (texts, triton.cdiv(max_len, BLOCK_M), heads // 2 if pair else heads)
    _varlen_forward[grid](qkv, out, cu, qkv.stride(0), out.stride(0), math.log2(math.e) / math.sqrt(head_dim),
                          HEADS=heads, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PAIR=pair,
                          num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


# -- decoders: grouped query heads, causal or not -------------------------------------------------------------------
# A program takes one text, one key/value head and BLOCK_M positions of each of the GROUP query heads that share it,
# stacked into one tile of GROUP * BLOCK_M rows: the group's K and V are read once, and the matmuls are as tall as
# flash attention's. Causal: the key blocks before the tile's first position need no mask; only those on the
# diagonal do, and none after it are read.
# The fastest of the shapes tried at Qwen3-0.6B's on the H200 box (bench/notes/llm_stage.md).
DECODER_BLOCK_ROWS, DECODER_BLOCK_N, DECODER_WARPS, DECODER_STAGES = 128, 32, 4, 3


@triton.jit
def _grouped_key_block(q, acc, running_max, running_sum, k_ptr, v_ptr, key_start, positions, length, stride_k,
                       stride_v, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                       CAUSAL: tl.constexpr):
    keys = key_start + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    if MASKED:
        inside = keys < length
        k = tl.load(k_ptr + keys[:, None] * stride_k + cols[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(v_ptr + keys[:, None] * stride_v + cols[None, :], mask=inside[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + keys[:, None] * stride_k + cols[None, :])
        v = tl.load(v_ptr + keys[:, None] * stride_v + cols[None, :])
    raw = tl.dot(q, tl.trans(k))
    if MASKED:
        keep = inside[None, :]
        if CAUSAL:
            keep = keep & (keys[None, :] <= positions[:, None])
        raw = tl.where(keep, raw, float("-inf"))
    return _softmax_step(raw, v, acc, running_max, running_sum, qk_scale)


@triton.jit
def _grouped_forward(q_ptr, k_ptr, v_ptr, out, cu, stride_q, stride_k, stride_v, stride_out, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
    text = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    kv_head = tl.program_id(2)
    start = tl.load(cu + text)
    length = tl.load(cu + text + 1) - start
    if first >= length:
        return
    # Row r of the tile: query head kv_head * GROUP + r // BLOCK_M, position first + r % BLOCK_M.
    r = tl.arange(0, GROUP * BLOCK_M)
    heads = kv_head * GROUP + r // BLOCK_M
    positions = first + r % BLOCK_M
    cols = tl.arange(0, HEAD_DIM)
    valid = positions < length
    row_offsets = (start + positions).to(tl.int64)
    q = tl.load(q_ptr + row_offsets[:, None] * stride_q + heads[:, None] * HEAD_DIM + cols[None, :],
                mask=valid[:, None], other=0.0)
    k_base = k_ptr + start.to(tl.int64) * stride_k + kv_head * HEAD_DIM
    v_base = v_ptr + start.to(tl.int64) * stride_v + kv_head * HEAD_DIM
    running_max = tl.full([GROUP * BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP * BLOCK_M], tl.float32)
    acc = tl.zeros([GROUP * BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        # Keys before `first` are seen by every row of the tile, in whole blocks; from the block that holds
        # `first` on, the diagonal's blocks are masked.
        unmasked = first - first % BLOCK_N
        stop = tl.minimum(first + BLOCK_M, length)
    else:
        unmasked = length - length % BLOCK_N
        stop = length
    for key_start in range(0, unmasked, BLOCK_N):
        acc, running_max, running_sum = _grouped_key_block(q, acc, running_max, running_sum, k_base, v_base,
                                                           key_start, positions, length, stride_k, stride_v,
                                                           qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL)
    for key_start in range(unmasked, stop, BLOCK_N):
        acc, running_max, running_sum = _grouped_key_block(q, acc, running_max, running_sum, k_base, v_base,
                                                           key_start, positions, length, stride_k, stride_v,
                                                           qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL)
    tl.store(out + row_offsets[:, None] * stride_out + heads[:, None] * HEAD_DIM + cols[None, :],
             (acc / running_sum[:, None]).to(out.dtype.element_ty), mask=valid[:, None])


def grouped_supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Where grouped_attention runs: a head size tl.dot takes, and groups of 1-8 query heads per key/value head."""
    group = heads // kv_heads
    return (supported(head_dim) and heads % kv_heads == 0 and group & (group - 1) == 0 and group <= 8
            and DECODER_BLOCK_ROWS // group >= 16)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                      causal: bool, block_rows: int = DECODER_BLOCK_ROWS, block_n: int = DECODER_BLOCK_N,
                      num_warps: int = DECODER_WARPS, num_stages: int = DECODER_STAGES) -> torch.Tensor:
    """Each text's attention over itself: q [tokens, heads, d], k and v [tokens, kv_heads, d] (each head's d
    values contiguous; the token stride free, so K and V may be views of a fused projection's output). Returns
    [tokens, heads, d], rows past cu[-1] unwritten. `block_rows`: the tile's rows, all query heads of a group
    together (BLOCK_M = block_rows // group positions of each)."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = torch.empty((tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    texts = cu.numel() - 1
    if texts == 0 or max_len == 0:
        return out
    block_m = block_rows // group
    grid = (texts, triton.cdiv(max_len, block_m), kv_heads)
    _grouped_forward[grid](q, k, v, out, cu, q.stride(0), k.stride(0), v.stride(0), out.stride(0),
                           math.log2(math.e) / math.sqrt(head_dim), GROUP=group, HEAD_DIM=head_dim,
                           BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, num_warps=num_warps,
                           num_stages=num_stages)
    return out
