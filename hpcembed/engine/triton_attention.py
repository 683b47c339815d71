"""Varlen attention for small heads (MiniLM's 32 dimensions), in Triton: the GPU fast path's attention kernel.

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

# The fastest of 11 shapes on the H200 box (bench/attention.py). TAIL_M: a text's rows past its last whole
# BLOCK_M are taken TAIL_M at a time, so a 147-token text computes 128 + 32 query rows, not 256.
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, TAIL_M = 128, 32, 4, 3, 32


@triton.jit
def _exp2(x, HALF_EXP: tl.constexpr):
    """2**x; HALF_EXP: in fp16 pairs (ex2.approx.f16x2), twice the special-function unit's fp32 rate, for
    probabilities that are rounded to 16 bits anyway (a variant bench/attention.py measures)."""
    if HALF_EXP:
        return tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                         dtype=tl.float16, is_pure=True, pack=2).to(tl.float32)
    else:
        return tl.math.exp2(x)


@triton.jit
def _key_block(q, acc, running_max, running_sum, k_base, v_base, key_start, length, stride_token, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HALF_EXP: tl.constexpr):
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
    # The scale rides in one fused multiply-add with the max (qk_scale > 0, so the max of the scaled scores is
    # the scaled max).
    new_max = tl.maximum(running_max, tl.max(raw, 1) * qk_scale)
    p = _exp2(raw * qk_scale - new_max[:, None], HALF_EXP)
    correction = tl.math.exp2(running_max - new_max)
    running_sum = running_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, new_max, running_sum


@triton.jit
def _query_block(qkv, out, start, length, first, stride_token, out_stride_token, qk_scale, head,
                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 HALF_EXP: tl.constexpr):
    """Rows first .. first + ROWS of one text and head, over all of the text's keys."""
    rows = first + tl.arange(0, ROWS)
    cols = tl.arange(0, HEAD_DIM)
    base = qkv + start.to(tl.int64) * stride_token + head * HEAD_DIM
    q = tl.load(base + rows[:, None] * stride_token + cols[None, :], mask=rows[:, None] < length, other=0.0)
    k_base = base + HEADS * HEAD_DIM
    v_base = base + 2 * HEADS * HEAD_DIM
    running_max = tl.full([ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    whole = length - length % BLOCK_N
    for key_start in range(0, whole, BLOCK_N):
        acc, running_max, running_sum = _key_block(q, acc, running_max, running_sum, k_base, v_base, key_start,
                                                   length, stride_token, qk_scale, HEAD_DIM, BLOCK_N, False,
                                                   HALF_EXP)
    if whole < length:
        acc, running_max, running_sum = _key_block(q, acc, running_max, running_sum, k_base, v_base, whole,
                                                   length, stride_token, qk_scale, HEAD_DIM, BLOCK_N, True,
                                                   HALF_EXP)
    acc = acc / running_sum[:, None]
    target = out + start.to(tl.int64) * out_stride_token + head * HEAD_DIM
    tl.store(target + rows[:, None] * out_stride_token + cols[None, :], acc.to(out.dtype.element_ty),
             mask=rows[:, None] < length)


@triton.jit
def _varlen_forward(qkv, out, cu, stride_token, out_stride_token, qk_scale,
                    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    TAIL_M: tl.constexpr, HALF_EXP: tl.constexpr):
    """Program (text, block, head): block < length // BLOCK_M is a whole block of BLOCK_M rows; the blocks after
    it take the remaining rows TAIL_M at a time (with TAIL_M == BLOCK_M, every block is BLOCK_M rows)."""
    text = tl.program_id(0)
    block = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu + text)
    length = tl.load(cu + text + 1) - start
    whole_blocks = length // BLOCK_M
    if block < whole_blocks:
        _query_block(qkv, out, start, length, block * BLOCK_M, stride_token, out_stride_token, qk_scale, head,
                     HEADS, HEAD_DIM, BLOCK_M, BLOCK_N, HALF_EXP)
    else:
        first = whole_blocks * BLOCK_M + (block - whole_blocks) * TAIL_M
        if first < length:
            _query_block(qkv, out, start, length, first, stride_token, out_stride_token, qk_scale, head,
                         HEADS, HEAD_DIM, TAIL_M, BLOCK_N, HALF_EXP)


def supported(head_dim: int) -> bool:
    """tl.dot needs a power of two of at least 16 on the reduced dimension."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def launch(qkv: torch.Tensor, out: torch.Tensor, cu: torch.Tensor, max_len: int, block_m: int = BLOCK_M,
           block_n: int = BLOCK_N, warps: int = NUM_WARPS, stages: int = NUM_STAGES, tail_m: int = TAIL_M,
           half_exp: bool = False) -> None:
    """The kernel over every text of `cu` in one launch; the grid's second axis covers the longest text's whole
    blocks and then its tail blocks (a shorter text's programs past its rows return at once)."""
    tokens, _, heads, head_dim = qkv.shape
    blocks = max_len // block_m + triton.cdiv(min(max_len, block_m - 1), tail_m)
    grid = (cu.numel() - 1, blocks, heads)
    _varlen_forward[grid](qkv, out, cu, qkv.stride(0), out.stride(0), math.log2(math.e) / math.sqrt(head_dim),
                          HEADS=heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, TAIL_M=tail_m,
                          HALF_EXP=half_exp, num_warps=warps, num_stages=stages)


def varlen_attention(qkv: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bidirectional attention of each text (rows of `cu`, int32 offsets) over itself. `qkv`: [tokens, 3, heads,
    head_dim], contiguous. Returns [tokens, heads, head_dim]; rows past cu[-1] are left unwritten."""
    tokens, _, heads, head_dim = qkv.shape
    out = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if cu.numel() > 1 and max_len > 0:
        launch(qkv, out, cu, max_len)
    return out
