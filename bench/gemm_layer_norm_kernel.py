"""A matmul whose epilogue adds the bias and the residual and applies LayerNorm: out = LayerNorm(a @ weight.T + bias
+ residual), one Triton kernel where cuBLAS's matmul and the add+LayerNorm kernel are two. Measured by
bench/gemm_layer_norm.py and not used by the encoder: on an H100 it was slower than the two kernels at both of a BERT
layer's shapes (bench/notes/gpu_stage.md, session 29). Kept so that the measurement can be repeated.

The two GEMMs a BERT layer follows with add+LayerNorm (attention output and FFN down) produce [tokens, hidden]. With
hidden small (384 for MiniLM) one program can hold whole rows, so it normalizes them before they leave registers:
the GEMM's output is never written to memory and read back, which saves two passes over [tokens, hidden] a
LayerNorm (the add+LayerNorm kernel reads the GEMM output and the residual and writes the result; here the residual
is read and the result written, in the epilogue).

Triton's tiles are powers of two, so a row of `hidden` columns is held as two pieces, the largest power of two
not above it and the rest (384 = 256 + 128, 768 = 512 + 256), each with its own accumulator fed by the same tile of
`a`; hidden sizes whose rest is not a power of two, or above MAX_HIDDEN (whose rows would not fit in registers),
are not served (`serves`) and keep the two-kernel path.

Tile shapes: the best of bench/gemm_layer_norm.py's sweep on an H100. On a machine without a GPU the kernel runs in
Triton's interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 1024
# BLOCK_M rows a program, BLOCK_K of the reduction a step, warps, pipeline stages: for the attention output
# (K = hidden) and for the FFN down projection (K = 4 * hidden).
TILE_SHORT_K = (64, 64, 8, 4)
TILE_LONG_K = (64, 64, 8, 4)


def tile_for(hidden: int, k: int) -> tuple[int, int, int, int]:
    return TILE_SHORT_K if k <= 2 * hidden else TILE_LONG_K


def _pieces(hidden: int) -> tuple[int, int] | None:
    first = 1 << (hidden.bit_length() - 1)
    rest = hidden - first
    if rest and rest & (rest - 1):
        return None
    return first, rest


def serves(hidden: int, k: int) -> bool:
    """Whether the fused kernel takes a [*, k] @ [k, hidden] matmul (else: matmul, then add+LayerNorm)."""
    return 16 <= hidden <= MAX_HIDDEN and _pieces(hidden) is not None and k % tile_for(hidden, k)[1] == 0


@triton.jit
def _accumulate(a_tile, weight, cols, ks, k, acc, K: tl.constexpr):
    """acc + a_tile @ weight[cols, k:k+BLOCK_K].T: the weight is [hidden, K] (nn.Linear's layout)."""
    w_tile = tl.load(weight + cols[None, :].to(tl.int64) * K + (k + ks[:, None]))
    return tl.dot(a_tile, w_tile, acc)


@triton.jit
def _biased_sum(acc, bias, residual, cols, row, in_rows, HIDDEN: tl.constexpr):
    offsets = row[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    res = tl.load(residual + offsets, mask=in_rows[:, None], other=0.0).to(tl.float32)
    return acc + tl.load(bias + cols).to(tl.float32)[None, :] + res


@triton.jit
def _normalize_store(centered, rstd, cols, row, in_rows, out, ln_weight, ln_bias, HIDDEN: tl.constexpr):
    w = tl.load(ln_weight + cols).to(tl.float32)
    b = tl.load(ln_bias + cols).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :] + b[None, :]
    offsets = row[:, None].to(tl.int64) * HIDDEN + cols[None, :]
    tl.store(out + offsets, y.to(out.dtype.element_ty), mask=in_rows[:, None])


@triton.jit(do_not_specialize=["rows"])
def _linear_add_layer_norm(a, weight, bias, residual, out, ln_weight, ln_bias, rows, eps,
                           K: tl.constexpr, HIDDEN: tl.constexpr, FIRST: tl.constexpr, REST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = row < rows
    ks = tl.arange(0, BLOCK_K)
    cols0 = tl.arange(0, FIRST)
    cols1 = FIRST + tl.arange(0, REST if REST > 0 else 16)
    acc0 = tl.zeros([BLOCK_M, FIRST], tl.float32)
    acc1 = tl.zeros([BLOCK_M, REST if REST > 0 else 16], tl.float32)
    a_rows = a + row[:, None].to(tl.int64) * K + ks[None, :]
    for k in range(0, K, BLOCK_K):
        a_tile = tl.load(a_rows + k, mask=in_rows[:, None], other=0.0)
        acc0 = _accumulate(a_tile, weight, cols0, ks, k, acc0, K)
        if REST > 0:
            acc1 = _accumulate(a_tile, weight, cols1, ks, k, acc1, K)
    total0 = _biased_sum(acc0, bias, residual, cols0, row, in_rows, HIDDEN)
    row_sum = tl.sum(total0, 1)
    if REST > 0:
        total1 = _biased_sum(acc1, bias, residual, cols1, row, in_rows, HIDDEN)
        row_sum += tl.sum(total1, 1)
    mean = row_sum / HIDDEN
    centered0 = total0 - mean[:, None]
    squares = tl.sum(centered0 * centered0, 1)
    if REST > 0:
        centered1 = total1 - mean[:, None]
        squares += tl.sum(centered1 * centered1, 1)
    rstd = 1.0 / tl.sqrt(squares / HIDDEN + eps)
    _normalize_store(centered0, rstd, cols0, row, in_rows, out, ln_weight, ln_bias, HIDDEN)
    if REST > 0:
        _normalize_store(centered1, rstd, cols1, row, in_rows, out, ln_weight, ln_bias, HIDDEN)


def linear_add_layer_norm(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor,
                          ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                          tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """LayerNorm(a @ weight.T + bias + residual) for a [T, K], weight [hidden, K], residual [T, hidden], contiguous;
    fp32 inside, the result in a's dtype. Only for shapes `serves` accepts."""
    rows, k = a.shape
    hidden = weight.shape[0]
    block_m, block_k, warps, stages = tile or tile_for(hidden, k)
    first, rest = _pieces(hidden)
    out = torch.empty((rows, hidden), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(rows, block_m),)
    _linear_add_layer_norm[grid](a, weight, bias, residual, out, ln_weight, ln_bias, rows, eps, K=k,
                                 HIDDEN=hidden, FIRST=first, REST=rest, BLOCK_M=block_m, BLOCK_K=block_k,
                                 num_warps=warps, num_stages=stages)
    return out
