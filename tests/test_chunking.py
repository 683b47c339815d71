"""Long texts in token windows (--chunk-tokens, --chunk-overlap, --chunk-pooling): the windows cover each text
with the requested overlap, each window's embedding is sentence-transformers' on that window's tokens, and the
pooled output is the mean of those."""
from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from hpcembed.errors import ConfigError
from hpcembed.tokenize.chunk import Chunker
from hpcembed.tokenize.hf import load_tokenizer

from .conftest import EDGE_TEXTS, read_manifest, run_cli, write_jsonl

WINDOW, OVERLAP = 48, 8
LONG = ("Chunked embedding keeps every sentence of a long report, where truncation drops the end. " * 40,
        "naïve café 北京 emoji 😀 and a word-with-many-sub-pieces like antidisestablishmentarianism " * 30)
TEXTS = [t for t in EDGE_TEXTS if len(t) < 10_000] + list(LONG)


def _content(model_dir, text: str):
    tok = load_tokenizer(model_dir)
    tok.no_truncation()
    tok.no_padding()            # the bundled tokenizer.json pads to 128
    enc = tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


def test_windows_cover_each_text_with_the_overlap(model_dir):
    chunker = Chunker.for_model(model_dir, WINDOW, OVERLAP, lowercase=False)
    assert chunker.content == WINDOW - 2            # [CLS] ... [SEP]
    windows, owners, spans = chunker.split(TEXTS)
    assert len(windows) == len(owners) == len(spans)
    for k, text in enumerate(TEXTS):
        ids, offsets = _content(model_dir, text)
        mine = np.flatnonzero(owners == k)
        assert list(spans[mine, 0]) == list(range(len(mine)))
        content = [list(windows[w][1:-1]) for w in mine]
        assert all(len(windows[w]) <= WINDOW for w in mine)
        assert all(windows[w][0] == chunker.prefix[0] and windows[w][-1] == chunker.suffix[-1] for w in mine)
        assert spans[mine[0], 1] == 0 and spans[mine[-1], 2] == len(text)     # together they cover the text
        if not ids:
            assert content == [[]]
            continue
        # Window j starts at j * (content - overlap); together they hold every token, in order, once past the
        # overlap, and the last one ends at the text's last token.
        step = chunker.content - OVERLAP
        for j, window in enumerate(content):
            assert window == ids[j * step: j * step + chunker.content]
        rebuilt = content[0] + [t for w in content[1:] for t in w[OVERLAP:]]
        assert rebuilt == ids
        for j in range(1, len(mine)):
            assert spans[mine[j], 1] == offsets[j * step][0] and spans[mine[j - 1], 1] < spans[mine[j], 1]
            assert spans[mine[j], 1] < spans[mine[j - 1], 2]       # the overlap: characters shared
            if j < len(mine) - 1:
                assert spans[mine[j], 2] == offsets[j * step + chunker.content - 1][1]
    assert len(np.flatnonzero(owners == len(TEXTS) - 1)) > 5
    assert chunker.describe()["texts_split"] == sum(len(_content(model_dir, t)[0]) > chunker.content for t in TEXTS)


@pytest.mark.parametrize("window, overlap", [(2, 0), (48, 46), (48, -1)])
def test_impossible_windows_are_refused(model_dir, window, overlap):
    with pytest.raises(ConfigError, match="chunk-"):
        Chunker.for_model(model_dir, window, overlap, lowercase=False)


def _st_window(st_model, ids) -> np.ndarray:
    features = {"input_ids": torch.tensor([list(ids)]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "token_type_ids": torch.zeros(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        return st_model(features)["sentence_embedding"][0].numpy()


def test_chunked_job_matches_sentence_transformers_per_window_and_pooled(tmp_path, st_model, model_dir):
    texts = {f"c{k}": t for k, t in enumerate(TEXTS)}
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    chunker = Chunker.for_model(model_dir, WINDOW, OVERLAP, lowercase=False)
    windows, owners, spans = chunker.split(list(texts.values()))
    expected = np.stack([_st_window(st_model, w) for w in windows])
    common = ["--input", str(tmp_path / "in.jsonl"), "--chunk-tokens", str(WINDOW), "--chunk-overlap", str(OVERLAP),
              "--max-batch-tokens", "1024", "--chunk-rows", "4", "--progress", "off"]

    proc = run_cli("run", "--output", str(tmp_path / "windows"), *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = ds.dataset(str(tmp_path / "windows"), format="parquet").to_table()
    assert table.column_names == ["id", "digest", "chunk", "start_char", "end_char", "embedding"]
    ids = list(texts)
    got = {(i, c): (s, e, v) for i, c, s, e, v in zip(
        table["id"].to_pylist(), table["chunk"].to_pylist(), table["start_char"].to_pylist(),
        table["end_char"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False))}
    assert len(got) == table.num_rows == len(windows)
    for w, (owner, (chunk, start, end)) in enumerate(zip(owners, spans)):
        s, e, vec = got[(ids[owner], int(chunk))]
        assert (s, e) == (start, end)
        assert float(np.dot(vec, expected[w])) >= 0.9999, (ids[owner], chunk)
    manifest = read_manifest(tmp_path / "windows")
    assert manifest["complete"] and manifest["rows_written"] == len(texts) == manifest["rows"]
    assert manifest["output_rows"] == manifest["chunks"] == len(windows) and manifest["chunk_tokens"] == WINDOW
    assert run_cli("verify", str(tmp_path / "windows")).returncode == 0

    proc = run_cli("run", "--output", str(tmp_path / "pooled"), "--chunk-pooling", "mean", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = ds.dataset(str(tmp_path / "pooled"), format="parquet").to_table()
    assert table.column_names == ["id", "digest", "embedding"] and table.num_rows == len(texts)
    pooled = dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False)))
    for k, i in enumerate(ids):
        mean = expected[owners == k].mean(axis=0)
        mean /= np.linalg.norm(mean)
        assert float(np.dot(pooled[i], mean)) >= 0.9999, i
    assert read_manifest(tmp_path / "pooled")["output_rows"] == len(texts)


def test_chunking_options_are_checked(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    common = ["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")]
    for extra, message in ((["--chunk-tokens", "512"], "more than the 256 tokens"),
                           (["--chunk-overlap", "4"], "need --chunk-tokens"),
                           (["--chunk-tokens", "16", "--chunk-overlap", "14"], "chunk-overlap must be")):
        proc = run_cli(*common, *extra)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("part-*"))
