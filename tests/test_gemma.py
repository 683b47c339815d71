"""Gemma 3 on the padding-free decoder path, and the sentence-transformers modules EmbeddingGemma brings (Dense
layers after pooling, sentence-transformers 6's Pooling config): tiny random-weight models saved by
sentence-transformers itself, against transformers and sentence-transformers, fp32 on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcembed.engine import ModelSpec, TorchEncoder, build_encoder
from hpcembed.engine.varlen import VarlenEncoder, supports
from hpcembed.errors import ConfigError
from hpcembed.io.ledger import model_identity

from .conftest import read_manifest, run_cli, write_jsonl
from .decoder_models import make_gemma_model
from .test_decoder import _cosines, _texts
from .test_engine import batch_of


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {bidirectional: make_gemma_model(root, bidirectional) for bidirectional in (True, False)}


def _batch(rows: int = 11, seed: int = 1):
    """Mixed lengths up to 40 tokens: past the local layers' window (8 keys, or 5 on either side bidirectionally)."""
    rng = np.random.default_rng(seed)
    return batch_of([list(rng.integers(3, 300, size=int(n))) + [0] for n in rng.integers(0, 40, size=rows)])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gemma_padding_free_matches_sentence_transformers_row_by_row(gemma, bidirectional):
    from sentence_transformers import SentenceTransformer
    spec = ModelSpec.load(gemma[bidirectional])
    assert spec.is_decoder and supports(spec) is None
    assert spec.pooling == "mean" and [d.out_features for d in spec.dense] == [96, 48] and spec.dim == 48
    # sentence-transformers 6.1+ keeps max_seq_length in the tokenizer's config, not sentence_bert_config.json.
    assert spec.max_seq_length == 128
    batch = _batch()
    encoder = VarlenEncoder(spec, "cpu", "fp32")
    got = encoder.encode(batch)
    assert encoder.weights.causal is not bidirectional
    assert [layer.window for layer in encoder.weights.layers] == ([5, 0, 5] if bidirectional else [8, 0, 8])
    st = SentenceTransformer(gemma[bidirectional], device="cpu")
    with torch.no_grad():
        for k in range(batch.num_rows):
            ids = torch.from_numpy(batch.token_ids[batch.offsets[k]: batch.offsets[k + 1]].astype(np.int64))[None]
            want = st.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["sentence_embedding"][0]
            assert np.abs(got[k] - want.numpy()).max() < 1e-4
    # The padded transformers path (the fallback engine) applies the Dense layers too.
    assert np.abs(TorchEncoder(spec, "cpu", "fp32").encode(batch) - got).max() < 1e-4


def test_each_gemma_difference_changes_the_embedding(gemma):
    """The window, the attention scale and the direction each matter for these texts: a path that ignored one would
    not match (the test above)."""
    spec = ModelSpec.load(gemma[True])
    batch = _batch(seed=2)
    encoder = VarlenEncoder(spec, "cpu", "fp32")
    want = encoder.encode(batch)
    w = encoder.weights
    for attribute, value in (("scale", None), ("causal", True)):
        saved = getattr(w, attribute)
        setattr(w, attribute, value)
        assert np.abs(encoder.encode(batch) - want).max() > 1e-3, attribute
        setattr(w, attribute, saved)
    for layer in w.layers:
        layer.window = 0
    assert np.abs(encoder.encode(batch) - want).max() > 1e-3


def test_dense_modules_and_their_weights_are_checked(gemma, tmp_path):
    import shutil
    spec = ModelSpec.load(gemma[True])
    base = model_identity(spec.path, None, tuple(d.path for d in spec.dense))
    assert base != model_identity(spec.path, None)          # a Dense layer's weights are part of the model
    copy = Path(shutil.copytree(gemma[True], tmp_path / "copy"))
    config = json.loads((copy / "2_Dense" / "config.json").read_text())
    (copy / "2_Dense" / "config.json").write_text(json.dumps({**config, "activation_function": "torch.nn.ReLU"}))
    with pytest.raises(ConfigError, match=r"Dense module 2_Dense has activation 'ReLU'; Identity, Tanh"):
        ModelSpec.load(str(copy))
    (copy / "2_Dense" / "config.json").write_text(json.dumps({**config, "out_features": 80}))
    with pytest.raises(ConfigError, match="Dense module 3_Dense takes 96 features, but what comes before it has 80"):
        ModelSpec.load(str(copy))
    (copy / "2_Dense" / "config.json").write_text(json.dumps({**config, "bias": False}))
    with pytest.raises(ConfigError, match=r"2_Dense: its weights do not match its config.json \(64 -> 96, bias"):
        VarlenEncoder(ModelSpec.load(str(copy)), "cpu", "fp32")


def test_gemma_fp8_runs_and_triton_attention_is_refused(gemma):
    from hpcembed.engine.fp8 import fidelity
    spec = ModelSpec.load(gemma[True])
    encoder = build_encoder(spec, "cpu", "fp8")
    assert 0.9 < fidelity(encoder, [_batch()]) < 1.0
    with pytest.raises(ConfigError, match="attention windows or scale are not the Triton kernel's"):
        VarlenEncoder(spec, "cpu", "fp32", attention="triton")


def test_gemma_job_with_prompt_and_dimensions_matches_sentence_transformers(gemma, tmp_path):
    """A whole job, as EmbeddingGemma is run: a prompt, --dimensions, edge-case texts and texts past the window."""
    from sentence_transformers import SentenceTransformer
    texts = _texts()
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    out = tmp_path / "out"
    proc = run_cli("run", "--input", str(src), "--output", str(out), "--model", gemma[True], "--engine", "varlen",
                   "--prompt", "task: search result | query: ", "--dimensions", "32", "--progress", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    st = SentenceTransformer(gemma[True], device="cpu")
    want = st.encode(list(texts.values()), prompt="task: search result | query: ", normalize_embeddings=True,
                     batch_size=8, truncate_dim=32)
    assert _cosines(out, want, texts).min() >= 0.9999
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["dim"] == 32


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU box)")


@cuda
@pytest.mark.parametrize("bidirectional", [True, False])
def test_cuda_gemma_two_instances_match_transformers(gemma, bidirectional):
    """The CUDA path as jobs run it (flash attention with the local layers' windows and Gemma's scale, the pieces
    between matmuls compiled, CUDA graphs, two instances) in bf16 and FP8 against fp32 on CPU, texts of up to 120
    tokens (the windows are 5 and 8)."""
    from hpcembed.engine.fp8 import fidelity
    from .test_engine import encode_through_pool
    spec = ModelSpec.load(gemma[bidirectional])
    rng = np.random.default_rng(5)
    batches = [batch_of([list(rng.integers(3, 300, size=int(n))) + [0] for n in rng.integers(0, 120, size=40)])
               for _ in range(4)]
    want = np.concatenate([VarlenEncoder(spec, "cpu", "fp32").encode(b) for b in batches])
    for dtype in ("bf16", "fp8"):
        encoders = [VarlenEncoder(spec, "cuda", dtype, fused_ops="auto", graph_tokens=8192) for _ in range(2)]
        assert encoders[0].attention_name == "flash"
        if dtype == "fp8":          # random weights 64 wide: 0.9785 measured on the H200 box
            assert fidelity(encoders[0], batches) > 0.95
        cos = np.sum(encode_through_pool(encoders, batches) * want, axis=1)
        assert cos.min() >= (0.999 if dtype == "bf16" else 0.95), (dtype, cos.min())
        assert sum(e.graph_batches for e in encoders) > 0


@pytest.mark.slow
def test_gemma_compiled_ops_match_eager(gemma):
    spec = ModelSpec.load(gemma[True])
    batch = _batch(seed=4)
    compiled = VarlenEncoder(spec, "cpu", "fp32", fused_ops="compile").encode(batch)
    assert np.abs(compiled - VarlenEncoder(spec, "cpu", "fp32").encode(batch)).max() < 1e-5
