"""hpcembed's Triton kernels against torch's own ops: on a GPU compiled, elsewhere in Triton's interpreter on CPU
tensors (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from hpcembed.engine.triton_attention import varlen_attention  # noqa: E402
from hpcembed.engine.triton_fused import add_layer_norm, embed, mean_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Outputs of LayerNorm are O(1): a few units in the last place of each dtype.
LN_TOLERANCE = {"fp32": 2e-5, "fp16": 4e-3, "bf16": 3.2e-2}


def _random(shape, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(device=DEVICE, dtype=DTYPES[dtype])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows, hidden", [(37, 384), (5, 48), (1, 384), (0, 384)])
def test_add_layer_norm_matches_torch(dtype, rows, hidden):
    """Rows not a multiple of the kernel's row block, a hidden size that is not a power of two, no rows at all."""
    x, residual = _random((rows, hidden), dtype, 1, 3.0), _random((rows, hidden), dtype, 2)
    weight, bias = _random((hidden,), dtype, 3), _random((hidden,), dtype, 4)
    got = add_layer_norm(x, residual, weight, bias, 1e-12)
    want = F.layer_norm(x.float() + residual.float(), (hidden,), weight.float(), bias.float(), 1e-12)
    assert got.dtype == x.dtype and got.shape == (rows, hidden)
    if rows:
        assert float((got.float() - want).abs().max()) <= LN_TOLERANCE[dtype]


@pytest.mark.parametrize("rows, k, hidden", [(70, 128, 384), (9, 64, 128)])
def test_matmul_with_layer_norm_epilogue_matches_torch(rows, k, hidden):
    """bench/gemm_layer_norm.py's kernel (not the encoder's: it lost to cuBLAS), kept right so that its measurement
    can be repeated: a row split into two power-of-two pieces (384 = 256 + 128) or one, rows not a multiple of the
    row block."""
    from bench.gemm_layer_norm_kernel import linear_add_layer_norm, serves
    a, weight = _random((rows, k), "fp32", 12), _random((hidden, k), "fp32", 13, k ** -0.5)
    bias, residual = _random((hidden,), "fp32", 14), _random((rows, hidden), "fp32", 15)
    ln_w, ln_b = _random((hidden,), "fp32", 16), _random((hidden,), "fp32", 17)
    assert serves(hidden, k) and not serves(896, k) and not serves(hidden, k + 1)
    got = linear_add_layer_norm(a, weight, bias, residual, ln_w, ln_b, 1e-12)
    want = F.layer_norm(F.linear(a, weight, bias) + residual, (hidden,), ln_w, ln_b, 1e-12)
    # On a GPU tl.dot takes fp32 inputs as TF32 (10-bit mantissa); the interpreter multiplies in fp32.
    assert float((got - want).abs().max()) <= (1e-4 if DEVICE == "cpu" else 1e-2)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_embedding_sum_and_layer_norm_matches_torch(dtype):
    vocab, places, hidden, tokens = 50, 20, 96, 45
    word, position = _random((vocab, hidden), dtype, 5), _random((places, hidden), dtype, 6)
    type_row, weight, bias = (_random((hidden,), dtype, s) for s in (7, 8, 9))
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(0, vocab, (tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    positions = torch.randint(0, places, (tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    got = embed(word, position, type_row, ids, positions, weight, bias, 1e-12)
    total = word.float()[ids.long()] + position.float()[positions.long()] + type_row.float()
    want = F.layer_norm(total, (hidden,), weight.float(), bias.float(), 1e-12)
    assert float((got.float() - want).abs().max()) <= LN_TOLERANCE[dtype]


@pytest.mark.parametrize("skip", [0, 2])
def test_mean_pool_by_offsets(skip):
    """Rows longer than one block of tokens, a row of one token, empty rows, a row shorter than `skip`, and
    padding tokens past the last offset (a CUDA-graph bucket's), which no row may take in."""
    lengths = [70, 1, 0, 33, 2, 5, 0]
    hidden, padding = 40, 9
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=DEVICE)
    states = _random((sum(lengths) + padding, hidden), "fp16", 11)
    got = mean_pool(states, None, cu, skip)
    assert got.dtype == torch.float32 and got.shape == (len(lengths), hidden)
    for k, n in enumerate(lengths):
        a = int(cu[k])
        taken = states[a + skip: a + n].float()
        want = taken.mean(0) if len(taken) else torch.zeros(hidden, device=DEVICE)
        assert float((got[k] - want).abs().max()) <= 1e-5, (k, n)


@pytest.mark.parametrize("dtype", ["fp16", pytest.param("bf16", marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter has no bf16 matmul (numpy has no bf16): checked on GPUs only"))])
@pytest.mark.parametrize("head_pairs", [False, True], ids=["head", "head-pairs"])
def test_triton_attention_matches_fp32_attention_text_by_text(dtype, head_pairs):
    # Lengths at and around the tiles' edges, one text of 1 token, the longest MiniLM takes, and two empty rows
    # then 40 padding tokens as a CUDA-graph bucket lays them out.
    lengths = [1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 256, 17, 0, 0]
    heads = 12 if DEVICE == "cuda" else 2       # the interpreter runs each program in turn
    tokens = sum(lengths) + 40
    qkv = _random((tokens, 3, heads, 32), dtype, 7, 2.0)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device=DEVICE, dtype=torch.int32)
    out = varlen_attention(qkv, cu, 256, head_pairs=head_pairs)
    tolerance = {"fp16": 4e-3, "bf16": 3.2e-2}[dtype]          # a few units in the last place of outputs up to 4
    for k, n in enumerate(lengths):
        if n == 0:
            continue
        a = int(cu[k])
        q, key, v = (qkv[a: a + n, j].float().transpose(0, 1)[None] for j in range(3))
        want = F.scaled_dot_product_attention(q, key, v)[0].transpose(0, 1)
        err = float((out[a: a + n].float() - want).abs().max())
        assert err <= tolerance, (n, err)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_rows",
                         [(4, 2, 64, 64), (4, 1, 32, 64), (2, 2, 32, 32)], ids=["group2", "group4", "group1"])
@pytest.mark.parametrize("block_n", [16, 64], ids=["keys-shorter", "keys-longer"])
def test_grouped_attention_matches_fp32_attention_text_by_text(causal, heads, kv_heads, head_dim, block_rows,
                                                              block_n):
    """Decoders' kernel: grouped query heads over shared K/V (K and V strided views of one fused projection, as
    the decoder hands them over), lengths around the tiles' edges, an empty text and a graph bucket's padding;
    blocks of keys shorter and longer than the tile's positions of each head."""
    from hpcembed.engine.triton_attention import grouped_attention
    lengths = [1, 15, 16, 17, 40, 64, 70, 0, 9]
    tokens = sum(lengths) + 12
    fused = _random((tokens, (heads + 2 * kv_heads) * head_dim), "fp16", 8, 2.0)
    q = fused[:, : heads * head_dim].reshape(tokens, heads, head_dim).contiguous()
    k = fused[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = fused[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device=DEVICE, dtype=torch.int32)
    # Small tiles on the interpreter (it runs each program in turn).
    out = grouped_attention(q, k, v, cu, max(lengths), causal, block_rows=block_rows, block_n=block_n, num_warps=4)
    group = heads // kv_heads
    for j, n in enumerate(lengths):
        if n == 0:
            continue
        a = int(cu[j])
        qq = q[a: a + n].float().transpose(0, 1)[None]
        kk, vv = (t[a: a + n].float().repeat_interleave(group, 1).transpose(0, 1)[None] for t in (k, v))
        want = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)[0].transpose(0, 1)
        err = float((out[a: a + n].float() - want).abs().max())
        assert err <= 4e-3, (n, err)
