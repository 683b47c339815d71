"""The BERT family (BERT, RoBERTa, XLM-R, CamemBERT) as the padding-free encoder reads it: which configurations it
serves, and the weights from model.safetensors with Q, K and V fused per layer."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .model import ModelSpec

SUPPORTED = ("bert", "roberta", "xlm-roberta", "camembert")
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def supports(spec: ModelSpec) -> str | None:
    """None when the fast path serves this model, else why not."""
    config = json.loads((Path(spec.path) / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        return f"model type {kind!r} (the fast path serves {', '.join(SUPPORTED)})"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {config['position_embedding_type']!r}"
    if config.get("hidden_act", "gelu") not in _ACTIVATIONS:
        return f"activation {config['hidden_act']!r}"
    if not _weights_file(Path(spec.path)):
        return "no model.safetensors"
    return None


def _weights_file(root: Path) -> Path | None:
    path = root / "model.safetensors"
    return path if path.exists() else None


@dataclass
class _Layer:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


class BertWeights:
    """The encoder's weights from model.safetensors, with Q, K and V fused into one matrix per layer."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device):
        from safetensors.torch import load_file
        root = Path(model_dir)
        config = json.loads((root / "config.json").read_text())
        self.config = config
        self.heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.act = _ACTIVATIONS[config.get("hidden_act", "gelu")]
        # RoBERTa numbers positions from padding_idx + 1.
        self.position_offset = int(config.get("pad_token_id", 1)) + 1 if config["model_type"] in _ROBERTA_LIKE else 0
        raw = load_file(str(_weights_file(root)))
        prefixes = ("bert.", "roberta.", "model.")
        raw = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in raw.items()}

        def get(name: str) -> torch.Tensor:
            if name not in raw:
                raise ConfigError(f"model {model_dir}: weight {name!r} missing from model.safetensors")
            return raw[name].to(device=device, dtype=dtype).contiguous()

        self.word = get("embeddings.word_embeddings.weight")
        self.position = get("embeddings.position_embeddings.weight")
        types = raw.get("embeddings.token_type_embeddings.weight")
        # Every row is segment 0 (single texts), so the token-type embedding is one constant row.
        self.type_row = (types[0].to(device=device, dtype=dtype) if types is not None
                         else torch.zeros(self.hidden, device=device, dtype=dtype))
        self.emb_ln = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.max_positions = self.position.shape[0]
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            att = p + "attention.self."
            self.layers.append(_Layer(
                qkv_w=torch.cat([get(att + n + ".weight") for n in ("query", "key", "value")]),
                qkv_b=torch.cat([get(att + n + ".bias") for n in ("query", "key", "value")]),
                out_w=get(p + "attention.output.dense.weight"), out_b=get(p + "attention.output.dense.bias"),
                ln1_w=get(p + "attention.output.LayerNorm.weight"), ln1_b=get(p + "attention.output.LayerNorm.bias"),
                up_w=get(p + "intermediate.dense.weight"), up_b=get(p + "intermediate.dense.bias"),
                down_w=get(p + "output.dense.weight"), down_b=get(p + "output.dense.bias"),
                ln2_w=get(p + "output.LayerNorm.weight"), ln2_b=get(p + "output.LayerNorm.bias")))


def encoder_forward(w: BertWeights, ids, positions, cu, max_len: int, attention,
                    gelu_epilogue: bool, ops) -> torch.Tensor:
    """Token states [T, hidden] for flat ids [T]; `positions` are position-embedding rows (from 0 within each row
    for BERT, from padding_idx + 1 for RoBERTa: the host adds w.position_offset), `cu` the row offsets.

    gelu_epilogue: apply GELU inside the up-projection's matmul (cuBLASLt's bias+GELU epilogue, which is the
    tanh approximation on CUDA), so the [T, 4*hidden] intermediate is written and read once instead of 3 times.
    """
    h, eps = w.hidden, w.eps
    x = ops.embed(w.word, w.position, w.type_row, ids, positions, *w.emb_ln, eps)
    heads, d = w.heads, h // w.heads
    for layer in w.layers:
        qkv = F.linear(x, layer.qkv_w, layer.qkv_b).view(-1, 3, heads, d)
        att = attention(qkv, cu, max_len)
        x = ops.add_layer_norm(F.linear(att.reshape(-1, h), layer.out_w, layer.out_b), x, layer.ln1_w,
                               layer.ln1_b, eps)
        if gelu_epilogue:
            up = torch._addmm_activation(layer.up_b, x, layer.up_w.t(), use_gelu=True)
        else:
            up = w.act(F.linear(x, layer.up_w, layer.up_b))
        x = ops.add_layer_norm(F.linear(up, layer.down_w, layer.down_b), x, layer.ln2_w, layer.ln2_b, eps)
    return x
