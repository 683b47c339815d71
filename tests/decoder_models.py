"""Tiny random-weight decoder embedders in sentence-transformers layout (Qwen3, Llama, Mistral, and a bidirectional
Qwen2 as gte-Qwen2 runs it), with a byte-level BPE tokenizer whose template appends the end-of-sequence token, as
Qwen3-Embedding's does. There is no model hub here: these stand in for the real ones, which differ in size only."""
from __future__ import annotations

import json
from pathlib import Path

import torch

EOS = "<|endoftext|>"
KINDS = ("qwen3", "llama", "mistral", "qwen2-bidirectional")
# Every dimension a multiple of 16, as FP8 matmuls need; two query heads per key/value head.
SHAPE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256)
TRAINING_TEXT = ["The quick brown fox jumps over the lazy dog.", "Embedding models turn text into vectors.",
                 "日本語のテキスト", "emoji 😀🎉", "query: passage: instruct"] * 20


def _config(kind: str, head_dim: int = 16):
    import transformers
    if kind == "qwen3":
        return transformers.Qwen3Config(**SHAPE, head_dim=head_dim, rope_theta=1_000_000.0)
    if kind == "llama":
        return transformers.LlamaConfig(**SHAPE, rope_theta=500_000.0)
    if kind == "mistral":
        return transformers.MistralConfig(**SHAPE, sliding_window=None)
    config = transformers.Qwen2Config(**SHAPE)
    config.is_causal = False        # gte-Qwen2's bidirectional attention, as transformers >= 5.2 reads it
    return config


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS).save_pretrained(path)


def make_decoder_model(root: Path, kind: str, pooling: str = "lasttoken", prompts: dict | None = None,
                       include_prompt: bool = True, seed: int = 0, head_dim: int = 16) -> str:
    """A model directory: weights, tokenizer, modules.json (Transformer, Pooling, Normalize) and prompts.
    `head_dim`: Qwen3's, which its config sets apart from the hidden size."""
    import transformers
    path = Path(root) / f"{kind}-{pooling}"
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(_config(kind, head_dim))
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": SHAPE["hidden_size"], "include_prompt": include_prompt,
        "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_lasttoken": pooling == "lasttoken"}))
    (path / "2_Normalize").mkdir()
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts or {},
                                                                          "default_prompt_name": None}))
    return str(path)


def make_gemma_model(root: Path, bidirectional: bool = True, seed: int = 0) -> str:
    """A tiny Gemma 3 embedder laid out as EmbeddingGemma is (mean pooling, then two Dense modules, one with a bias
    and tanh, then Normalize), saved by sentence-transformers itself. Local layers see 8 keys, so texts longer than
    that test the window; the scores' scale (query_pre_attn_scalar 20) is not head_dim's; global layers' rotary
    embedding is linear-scaled, as the larger Gemma 3 models' is."""
    import transformers
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:                 # sentence-transformers before 6.1
        from sentence_transformers import models
    path = Path(root) / f"gemma3-{'bidirectional' if bidirectional else 'causal'}"
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        **{**SHAPE, "num_hidden_layers": 3}, head_dim=16, sliding_window=8, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        use_bidirectional_attention=bidirectional,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 4.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    model = transformers.AutoModel.from_config(config)
    with torch.no_grad():               # trained norms are not all zeros (Gemma scales by 1 + weight)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    transformer_dir = path.parent / (path.name + "-transformer")
    model.save_pretrained(transformer_dir, safe_serialization=True)
    _tokenizer(transformer_dir)
    hidden = SHAPE["hidden_size"]
    st = SentenceTransformer(modules=[
        models.Transformer(str(transformer_dir), max_seq_length=128), models.Pooling(hidden, "mean"),
        models.Dense(hidden, 96, bias=True, activation_function=torch.nn.Tanh()),
        models.Dense(96, 48, bias=False, activation_function=torch.nn.Identity()), models.Normalize()],
        device="cpu")
    st.save(str(path))
    return str(path)
