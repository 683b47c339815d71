"""The encoders: the padding-free fast path's math against transformers (on CPU its attention is padded SDPA),
the generic transformers fallback on a random architecture it alone serves, and on CUDA the real varlen kernel
with two instances against sentence-transformers."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from hpcembed.engine import ModelSpec, TorchEncoder, build_encoder
from hpcembed.engine.instances import InstancePool
from hpcembed.engine.bert import supports
from hpcembed.engine.varlen import VarlenEncoder
from hpcembed.errors import ConfigError
from hpcembed.tokenize import HFTokenizer
from hpcembed.tokenize.batch import TokenBatch

from .conftest import EDGE_TEXTS, reference


def batch_of(token_lists: list[list[int]]) -> TokenBatch:
    return TokenBatch.build(token_lists, [f"r{k}" for k in range(len(token_lists))], np.arange(len(token_lists)), 0)


def edge_batch(spec: ModelSpec) -> TokenBatch:
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    return batch_of(tok.encode(EDGE_TEXTS + ["a much longer sentence " * 20, "x"]))


def encode_through_pool(encoders: list, batches: list) -> np.ndarray:
    """The batches' embeddings, in order, through an InstancePool of `encoders` (as an encoder rank runs them)."""
    pool = InstancePool(encoders)
    try:
        for b in batches:
            pool.submit(b)
        got = []
        while len(got) < len(batches):
            got.extend(e for _, e in pool.completed(wait=5.0))
    finally:
        pool.close()
    return np.concatenate(got)


def _interpreted_triton() -> None:
    """Triton kernels take CPU tensors only in Triton's interpreter (tests/conftest.py, machines without a GPU);
    on a GPU the CUDA tests below run them."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need Triton's interpreter")


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "lasttoken"])
def test_bundled_model_padding_free_matches_transformers(model_dir, pooling):
    spec = ModelSpec.load(model_dir, pooling=pooling)
    batch = edge_batch(spec)
    fast = VarlenEncoder(spec, "cpu", "fp32").encode(batch)
    ref = TorchEncoder(spec, "cpu", "fp32").encode(batch)
    assert fast.shape == ref.shape == (batch.num_rows, 384)
    assert np.abs(fast - ref).max() < 1e-5


@pytest.mark.parametrize("pooling, fused_ops", [("mean", "eager"), ("cls", "eager"), ("max", "eager"),
                                                ("lasttoken", "eager"), ("mean", "triton")])
def test_graph_bucket_padding_changes_nothing(model_dir, pooling, fused_ops):
    """A batch padded to its CUDA-graph bucket (spare tokens after the last offset, empty spare rows) embeds
    exactly as the unpadded batch; on CPU the padded layout runs eagerly, so this checks it without a GPU (and
    the Triton kernels in Triton's interpreter)."""
    if fused_ops == "triton":
        _interpreted_triton()
    spec = ModelSpec.load(model_dir, pooling=pooling)
    batch = edge_batch(spec)
    bucketed = VarlenEncoder(spec, "cpu", "fp32", graph_tokens=2048, fused_ops=fused_ops)
    key = bucketed.bucket(batch.num_tokens, batch.num_rows, int(batch.lengths.max()))
    assert key is not None and key in bucketed.graphs
    assert key[0] > batch.num_tokens and key[1] > batch.num_rows          # really padded on both axes
    ref = TorchEncoder(spec, "cpu", "fp32").encode(batch)
    got = bucketed.encode(batch)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-5
    # Too small a batch, or rows longer than the model's limit, run as they are.
    assert bucketed.bucket(100, 4, 30) is None
    assert bucketed.bucket(1500, 10, spec.max_seq_length + 1) is None


def _random_model(tmp_path, kind: str) -> str:
    import transformers
    torch.manual_seed(0)
    common = dict(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  max_position_embeddings=80)
    if kind == "bert":
        config = transformers.BertConfig(**common, hidden_act="gelu_new")
    elif kind == "xlm-roberta":
        config = transformers.XLMRobertaConfig(**common, pad_token_id=1)
    else:       # an architecture only the generic path serves
        config = transformers.DistilBertConfig(vocab_size=120, dim=48, n_layers=2, n_heads=4, hidden_dim=96,
                                               max_position_embeddings=80)
    model = transformers.AutoModel.from_config(config)
    path = tmp_path / kind
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _random_batch(rows: int = 9, seed: int = 1) -> TokenBatch:
    rng = np.random.default_rng(seed)
    return batch_of([[0] + list(rng.integers(5, 120, size=int(n))) + [2] for n in rng.integers(0, 60, size=rows)])


@pytest.mark.parametrize("fused_ops", [pytest.param("compile", marks=pytest.mark.slow), "triton"])
def test_fused_ops_match_transformers(model_dir, fused_ops):
    """torch.compile's fused pieces, and hpcembed's Triton kernels (in Triton's interpreter without a GPU)."""
    if fused_ops == "triton":
        _interpreted_triton()
    spec = ModelSpec.load(model_dir)
    batch = edge_batch(spec)
    fast = VarlenEncoder(spec, "cpu", "fp32", fused_ops=fused_ops).encode(batch)
    ref = TorchEncoder(spec, "cpu", "fp32").encode(batch)
    assert np.abs(fast - ref).max() < 1e-5


def test_fused_triton_ops_on_cpu_is_a_clear_error(model_dir, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="--fused-ops triton needs Triton and a CUDA device"):
        VarlenEncoder(ModelSpec.load(model_dir), "cpu", "fp32", fused_ops="triton")


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_random_configs_padding_free_matches_transformers(tmp_path, kind):
    spec = ModelSpec.load(_random_model(tmp_path, kind))
    assert supports(spec) is None
    batch = _random_batch()
    fast = VarlenEncoder(spec, "cpu", "fp32").encode(batch)
    ref = TorchEncoder(spec, "cpu", "fp32").encode(batch)
    assert np.abs(fast - ref).max() < 1e-5


def test_batches_over_the_row_limit_are_split(tmp_path):
    """Flash attention takes at most 65535 sequences per launch; a batch with more is encoded in parts."""
    spec = ModelSpec.load(_random_model(tmp_path, "bert"))
    batch = _random_batch(rows=11)
    whole = VarlenEncoder(spec, "cpu", "fp32").encode(batch)
    limited = VarlenEncoder(spec, "cpu", "fp32")
    limited.MAX_ROWS = 4
    assert np.abs(limited.encode(batch) - whole).max() < 1e-6


def test_generic_fallback_serves_other_architectures(tmp_path):
    import transformers
    spec = ModelSpec.load(_random_model(tmp_path, "distilbert"))
    assert "distilbert" in supports(spec)
    encoder = build_encoder(spec, "cpu", "auto", engine="auto")
    assert encoder.engine == "torch"
    batch = _random_batch(rows=5)
    got = encoder.encode(batch)
    # transformers directly, row by row (no padding at all), mean-pooled: the fallback's padding must not leak in.
    model = transformers.AutoModel.from_pretrained(spec.path).eval()
    with torch.no_grad():
        for k in range(batch.num_rows):
            ids = torch.from_numpy(batch.token_ids[batch.offsets[k]: batch.offsets[k + 1]].astype(np.int64))[None]
            expect = model(input_ids=ids).last_hidden_state[0].mean(0).numpy()
            assert np.abs(got[k] - expect).max() < 1e-5


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU box)")


@cuda
@pytest.mark.parametrize("dtype, attention", [("fp16", "flash"), ("bf16", "flash"), ("fp16", "triton")])
def test_cuda_varlen_two_instances_match_sentence_transformers(model_dir, st_model, dtype, attention):
    spec = ModelSpec.load(model_dir)
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    texts = EDGE_TEXTS * 3
    # The default CUDA path (GELU in the matmul epilogue, the Triton fused ops, CUDA graphs) for fp16, eager for bf16.
    fast = dtype == "fp16"
    encoders = [VarlenEncoder(spec, "cuda", dtype, fused_ops="auto" if fast else "eager", gelu_epilogue=True,
                              graph_tokens=1024 if fast else 0, attention=attention) for _ in range(2)]
    got = encode_through_pool(encoders, [batch_of(tok.encode(texts[k: k + 7])) for k in range(0, len(texts), 7)])
    ref = reference(st_model, texts)
    cos = np.sum(got * ref, axis=1)
    assert cos.min() >= 0.999, cos.min()
    if fast:
        assert sum(e.graph_batches for e in encoders) > 0        # the graphs were replayed, not bypassed


@cuda
def test_cuda_batch_of_more_rows_than_one_attention_launch(model_dir, st_model):
    """70,000 one-word rows in one batch: over flash attention's 65,535 sequences per launch, so it is split."""
    spec = ModelSpec.load(model_dir)
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    words = ["cat", "ship", "north", "", "雨", "🙂"]
    encoded = tok.encode(words)
    rows = 70_000
    batch = batch_of([encoded[k % len(words)] for k in range(rows)])
    got = VarlenEncoder(spec, "cuda", "fp16", graph_tokens=262144).encode(batch)
    ref = reference(st_model, words)
    cos = np.sum(got * ref[np.arange(rows) % len(words)], axis=1)
    assert got.shape == (rows, spec.dim) and cos.min() >= 0.999, cos.min()


def test_kernel_cache_directory(tmp_path, monkeypatch):
    """--cache-dir, else HPCEMBED_CACHE_DIR, else the XDG default; the compilers' own variables win; a named
    directory that cannot be made is a clear error, an unusable default falls back to a temporary one."""
    from hpcembed.cache import use_cache_dir
    from hpcembed.errors import ConfigError
    for name in ("HPCEMBED_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert use_cache_dir() == tmp_path / "xdg" / "hpcembed"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "hpcembed" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.setenv("HPCEMBED_CACHE_DIR", str(tmp_path / "env"))
    assert use_cache_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"            # the user's own setting stays
    assert use_cache_dir(str(tmp_path / "opt")) == tmp_path / "opt"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="--cache-dir .*a-file"):
        use_cache_dir(str(blocker / "cache"))
    monkeypatch.setenv("HPCEMBED_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(ConfigError, match="HPCEMBED_CACHE_DIR"):
        use_cache_dir()
    monkeypatch.delenv("HPCEMBED_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    fallback = use_cache_dir()
    assert fallback.is_dir() and blocker not in fallback.parents
    shutil.rmtree(fallback)
