"""Each output row carries its content digest (issue 21): xxh3-128 of its text, seeded with everything between the
text and its embedding (model and tokenizer by content, max_seq_length, pooling, dtype, prompt, dimensions); a
chunked text's windows by their token ids. Equal texts get equal digests under any id, and a job that would embed
them differently (here, fewer dimensions) gets other digests."""
from __future__ import annotations

import pyarrow.dataset as ds
import xxhash

from .conftest import EDGE_TEXTS, mpirun, needs_mpi, read_manifest, run_cli, write_jsonl


def _digests(out) -> dict[str, bytes]:
    table = ds.dataset(str(out), format="parquet").to_table()
    assert str(table.schema.field("digest").type) == "fixed_size_binary[16]"
    return dict(zip(table["id"].to_pylist(), table["digest"].to_pylist()))


def _texts() -> dict[str, str]:
    texts = {f"d{k:03d}": t for k, t in enumerate(EDGE_TEXTS)}
    texts.update({f"copy{k}": EDGE_TEXTS[k] for k in (4, 5, 6)})        # the same texts under other ids
    return texts


def test_digests_are_of_the_text_and_of_what_shapes_the_embedding(tmp_path, model_dir):
    texts = _texts()
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    outs = {}
    for name, options in (("full", []), ("dims", ["--dimensions", "128"])):
        outs[name] = tmp_path / name
        proc = run_cli("run", "--input", str(src), "--output", str(outs[name]), "--model", model_dir, "--progress",
                       "off", *options)
        assert proc.returncode == 0, proc.stderr[-2000:]
    got = _digests(outs["full"])
    manifest = read_manifest(outs["full"])
    assert manifest["row_digest"]["algorithm"] == "xxh3-128" and manifest["row_digest"]["of"] == "text"
    # Recomputed here from each text's UTF-8 bytes (control characters, emoji, CJK and 300k-character texts too).
    seed = manifest["row_digest"]["seed"]
    want = {i: xxhash.xxh3_128_digest(t.encode("utf-8"), seed=seed) for i, t in texts.items()}
    assert got == want
    assert all(got[f"copy{k}"] == got[f"d{k:03d}"] for k in (4, 5, 6))
    assert len(set(got.values())) == len(set(texts.values()))
    other = _digests(outs["dims"])
    assert read_manifest(outs["dims"])["row_digest"]["seed"] != seed and not set(other.values()) & set(got.values())


@needs_mpi
def test_a_pooled_texts_digest_is_of_its_windows_in_order(tmp_path, model_dir):
    texts = {f"w{k}": f"window digest text {k} " * (3 + 7 * k) for k in range(12)}
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    common = ["--input", str(src), "--model", model_dir, "--chunk-tokens", "32", "--chunk-overlap", "4", "--tokenizer-ranks", "2",
              "--unit-rows", "4"]
    for name, extra in (("windows", []), ("pooled", ["--chunk-pooling", "mean"])):
        proc = mpirun(4, *common, "--output", str(tmp_path / name), *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    windows = ds.dataset(str(tmp_path / "windows"), format="parquet").to_table().sort_by([("id", "ascending"),
                                                                                          ("chunk", "ascending")])
    pooled = _digests(tmp_path / "pooled")
    by_text: dict[str, bytes] = {}
    for row_id, digest in zip(windows["id"].to_pylist(), windows["digest"].to_pylist()):
        by_text[row_id] = by_text.get(row_id, b"") + digest
    assert max(len(v) for v in by_text.values()) > 16                  # some texts are several windows
    assert pooled == {i: xxhash.xxh3_128_digest(v) for i, v in by_text.items()}
