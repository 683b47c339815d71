"""Prompts and --dimensions (issue 20): a job embeds what sentence-transformers embeds for the same prompt (the
model's default, one named, or given) and the same truncate_dim, row by row, with the prompt's tokens pooled or
left out as the model's pooling says, on both CPU engines; a job records them, and what cannot work is refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from .conftest import EDGE_TEXTS, read_manifest, read_output, run_cli, write_jsonl

PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: "}


def _model(tmp_path, model_dir, include_prompt: bool):
    """The bundled model with prompts (default: query), its pooling including the prompt or leaving it out."""
    root = tmp_path / f"model-{include_prompt}"
    shutil.copytree(model_dir, root, ignore=shutil.ignore_patterns("model.safetensors"))
    (root / "model.safetensors").symlink_to(f"{model_dir}/model.safetensors")
    (root / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": PROMPTS, "default_prompt_name": "query"}))
    pooling = json.loads((root / "1_Pooling" / "config.json").read_text())
    (root / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    return root


def _texts() -> dict[str, str]:
    texts = [t for t in EDGE_TEXTS if len(t) < 10_000] + [f"prompted row {k} " * (1 + k % 6) for k in range(20)]
    return {f"p{k:03d}": t for k, t in enumerate(texts)}


def _assert_matches(out, want: np.ndarray, texts: dict[str, str], dim: int) -> None:
    got = read_output(out)
    assert set(got) == set(texts) and {len(v) for v in got.values()} == {dim}
    cos = [float(got[i] @ want[k]) / max(float(np.linalg.norm(want[k])), 1e-12) for k, i in enumerate(texts)]
    assert min(cos) >= (0.999 if torch.cuda.is_available() else 0.9999), min(cos)     # fp16 on the GPU box


@pytest.mark.parametrize("engine, include_prompt",
                         [("varlen", True), pytest.param("torch", False, marks=pytest.mark.slow), ("varlen", False)])
def test_prompts_and_dimensions_match_sentence_transformers(tmp_path, model_dir, engine, include_prompt):
    from sentence_transformers import SentenceTransformer
    model = _model(tmp_path, model_dir, include_prompt)
    texts = _texts()
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    st = SentenceTransformer(str(model), device="cpu")
    assert st[1].include_prompt is include_prompt
    # The model's default prompt and 128 dimensions; then a named prompt in full width.
    runs = [([], "query", 128), (["--prompt-name", "passage"], "passage", 384)]
    for k, (options, name, dim) in enumerate(runs):
        out = tmp_path / f"out-{k}"
        proc = run_cli("run", "--input", str(src), "--output", str(out), "--model", str(model), "--engine", engine,
                       "--progress", "off", *options, *(["--dimensions", str(dim)] if dim != 384 else []))
        assert proc.returncode == 0, proc.stderr[-2000:]
        want = st.encode(list(texts.values()), prompt_name=name, normalize_embeddings=True, batch_size=16,
                         truncate_dim=dim if dim != 384 else None)
        _assert_matches(out, want, texts, dim)
        manifest = read_manifest(out)
        assert manifest["prompt"] == PROMPTS[name] and manifest["dim"] == dim
        assert manifest.get("dimensions") == (dim if dim != 384 else None)
        encoder = next(r for r in manifest["ranks"] if "encoder" in r["role"])
        assert encoder["attention"] == ("" if engine == "torch" else "triton" if torch.cuda.is_available() else
                                        "padded")           # which attention kernel ran is in the manifest
    # The prompt is part of the job: another prompt into the same output is another job.
    again = run_cli("run", "--input", str(src), "--output", str(tmp_path / "out-0"), "--model", str(model),
                    "--engine", engine, "--dimensions", "128", "--prompt", "", "--progress", "off")
    assert again.returncode == 2 and "different job" in again.stderr and "prompt" in again.stderr


def test_no_prompt_is_sentence_transformers_without_one(tmp_path, model_dir, st_model):
    model = _model(tmp_path, model_dir, True)
    texts = _texts()
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    proc = run_cli("run", "--input", str(src), "--output", str(tmp_path / "out"), "--model", str(model),
                   "--prompt", "", "--progress", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_matches(tmp_path / "out", st_model.encode(list(texts.values()), normalize_embeddings=True), texts, 384)
    assert "prompt" not in read_manifest(tmp_path / "out")


@pytest.mark.parametrize("options, message", [
    (["--prompt-name", "title"], "has no prompt named 'title' (its prompts: 'query', 'passage')"),
    (["--prompt", "q: ", "--prompt-name", "query"], "give --prompt or --prompt-name, not both"),
    (["--dimensions", "512"], "--dimensions 512 is more than the 384 dimensions"),
    (["--chunk-tokens", "64"], "with --chunk-tokens is not supported"),
])
def test_what_cannot_work_is_refused(tmp_path, model_dir, options, message):
    model = _model(tmp_path, model_dir, True)
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "text": "one row"}])
    proc = run_cli("run", "--input", str(src), "--output", str(tmp_path / "out"), "--model", str(model),
                   "--progress", "off", *options)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
