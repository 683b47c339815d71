"""FP8 matmuls for the decoder path (--dtype fp8), and the check that they are faithful on the job's own texts.

Each of a layer's four matmuls holds its weight in e4m3 with one scale per output channel; its input is quantized
per token (one scale per row) when it runs, and torch._scaled_mm multiplies the two with both scales applied, out
in bf16. Everything else (embeddings, norms, rotary, attention, pooling) stays bf16. At MiniLM's shapes FP8 paid
1.14x on the GEMMs alone, at Qwen3-Embedding's 1.43-1.56x (issue 20's probe), so it is offered for decoders only.

FP8 error depends on the activations (outliers), so before a job embeds with it every encoder rank embeds a sample
of the job's own texts both ways, with the bf16 weights it still holds, and refuses to run below a minimum cosine
(launch/build.py); the bf16 copies are then dropped.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def quantize_rows_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale in e4m3, scale [rows, 1] fp32), one scale per row, the row's largest magnitude mapping to 448."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_eager as one Triton kernel on CUDA (one read of x, one write), eager elsewhere."""
    if x.is_cuda:
        from .triton_fused import quantize_rows as fused
        return fused(x)
    return quantize_rows_eager(x)


def scaled_mm_reference(qx: torch.Tensor, qweight: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor):
    """What torch._scaled_mm computes with row-wise scales, on CPU: the e4m3 values' products (exact in fp32),
    summed in fp32, scaled, out in bf16. torch's own CPU kernel takes only per-tensor scales before torch 2.13, so
    the CPU path (tests, bench/fp8_fidelity.py) computes it this way on every version."""
    return ((qx.float() @ qweight.float().t()) * sx * sw).to(torch.bfloat16)


class Fp8Linear:
    """x @ W.T (+ b) with W in e4m3 (per-output-channel scales) and x quantized per row as it comes. Until
    drop_reference(), the bf16 weight is kept, and `reference = True` multiplies with it instead (the fidelity
    check's other side)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        if out_features % 16 or in_features % 16:
            raise ValueError(f"FP8 matmuls need both weight dimensions divisible by 16, got {tuple(weight.shape)}")
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
        self.qweight = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
        self.scale = scale[None, :].contiguous()           # [1, out] fp32
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self.reference = False

    def drop_reference(self) -> None:
        self.weight, self.reference = None, False

    @property
    def takes_fp8(self) -> bool:
        """Whether the op before may hand this matmul its input already quantized, (e4m3 values, row scales)."""
        return not self.reference

    def __call__(self, x) -> torch.Tensor:
        """x: [rows, in] in bf16, or already quantized as (values, scales)."""
        if self.reference:
            return F.linear(x, self.weight, self.bias)
        qx, sx = x if isinstance(x, tuple) else quantize_rows(x)
        if qx.is_cuda:
            out = torch._scaled_mm(qx, self.qweight.t(), scale_a=sx, scale_b=self.scale, out_dtype=torch.bfloat16)
        else:
            out = scaled_mm_reference(qx, self.qweight, sx, self.scale)
        return out + self.bias if self.bias is not None else out


def fp8_linears(encoder) -> list[Fp8Linear]:
    return [lin for layer in encoder.weights.layers for lin in (layer.qkv, layer.out, layer.gate_up, layer.down)
            if isinstance(lin, Fp8Linear)]


def fidelity(encoder, batches: list) -> float:
    """The minimum cosine, over every row of `batches`, between `encoder`'s FP8 embeddings and its bf16 ones
    (its kept bf16 weights; both eager, no CUDA graph)."""
    linears = fp8_linears(encoder)
    if not linears or any(lin.weight is None for lin in linears):
        raise ValueError("the encoder holds no FP8 matmuls with their bf16 weights")
    saved, encoder.graph_tokens = encoder.graph_tokens, 0
    try:
        for lin in linears:
            lin.reference = True
        reference = np.concatenate([encoder.encode(b) for b in batches])
        for lin in linears:
            lin.reference = False
        quantized = np.concatenate([encoder.encode(b) for b in batches])
    finally:
        encoder.graph_tokens = saved
        for lin in linears:
            lin.reference = False
    a = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    b = quantized / np.maximum(np.linalg.norm(quantized, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1))) if len(a) else 1.0


def drop_references(encoders: list) -> None:
    """Free the bf16 weights the fidelity check used."""
    for encoder in encoders:
        for lin in fp8_linears(encoder):
            lin.drop_reference()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
