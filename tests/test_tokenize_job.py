"""`hpcembed tokenize` then `hpcembed run --input TOKDIR`: the two-job pipeline gives the same embeddings as one
job, under one process and under mpiexec, and a token directory is refused by a model with another tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from hpcembed.engine import ModelSpec
from hpcembed.tokenize import HFTokenizer

from .conftest import EDGE_TEXTS, mpirun, needs_mpi, read_manifest, run_cli, write_jsonl
from .test_job import assert_matches


@pytest.fixture
def corpus(tmp_path):
    texts = {f"e{k}": t for k, t in enumerate(EDGE_TEXTS)}
    texts.update({f"w{k}": f"row {k} of a plain corpus, with words " * (1 + k % 9) for k in range(150)})
    write_jsonl(tmp_path / "a.jsonl", [{"id": k, "text": t} for k, t in list(texts.items())[:90]])
    write_jsonl(tmp_path / "b.jsonl", [{"id": k, "text": t} for k, t in list(texts.items())[90:]])
    return texts


def read_token_dir(path) -> dict[str, list[int]]:
    out = {}
    for shard in sorted(path.glob("tokens-*.arrow")):
        with pa.memory_map(str(shard)) as src:
            table = pa.ipc.open_file(src).read_all()
        assert table.schema.field("input_ids").type == pa.list_(pa.int32())
        out.update(zip(table.column("id").to_pylist(), table.column("input_ids").to_pylist()))
    return out


def test_tokenize_then_embed_matches_sentence_transformers(tmp_path, corpus, st_model, model_dir):
    tok, out = tmp_path / "tok", tmp_path / "out"
    proc = run_cli("tokenize", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--output",
                   str(tok), "--unit-rows", "40", "--chunk-rows", "16")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tok)
    assert manifest["kind"] == "tokens" and manifest["complete"] and (tok / "_SUCCESS").exists()
    assert manifest["rows_written"] == len(corpus) and len(manifest["shards"]) == 5
    # EDGE_TEXTS' giant text is truncated, and the warning names the limit.
    assert manifest["texts_truncated"] >= 1 and "were longer than 256 tokens" in proc.stderr, proc.stderr
    # Token shards hold exactly the HF backend's ids (the default backend may be budtiktok).
    spec = ModelSpec.load(model_dir)
    hf = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    tokens = read_token_dir(tok)
    ids = sorted(corpus)
    assert [tokens[i] for i in ids] == hf.encode([corpus[i] for i in ids])
    proc = run_cli("run", "--input", str(tok), "--output", str(out), "--max-batch-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    assert_matches(out, corpus, st_model)
    embedded = read_manifest(out)
    assert {i["format"] for i in embedded["inputs"]} == {"tokens"}
    assert embedded["tokenizer"] == manifest["tokenizer"]


@needs_mpi
def test_tokenize_and_embed_under_mpiexec(tmp_path, corpus, st_model):
    tok, out = tmp_path / "tok", tmp_path / "out"
    proc = mpirun(3, "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--output", str(tok),
                  "--unit-rows", "20", "--chunk-rows", "8", command="tokenize")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tok)
    writers = {r["rank"] for r in manifest["ranks"] if r["role"] == "tokenizer" and r["rows"] > 0}
    assert writers == {1, 2}, manifest["ranks"]
    assert len(read_token_dir(tok)) == len(corpus)
    proc = mpirun(4, "--input", str(tok), "--output", str(out), "--max-batch-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    assert_matches(out, corpus, st_model)


def test_token_dir_of_another_tokenizer_is_refused(tmp_path, corpus):
    tok = tmp_path / "tok"
    assert run_cli("tokenize", "--input", str(tmp_path / "a.jsonl"), "--output", str(tok),
                   "--max-seq-length", "128").returncode == 0
    proc = run_cli("run", "--input", str(tok), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"token directory {tok} was made by a different tokenizer" in proc.stderr
    assert "max_seq_length 128 there, 256 here" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    # The same model with the same truncation is accepted.
    assert run_cli("run", "--input", str(tok), "--output", str(tmp_path / "ok"),
                   "--max-seq-length", "128").returncode == 0


def test_fingerprint_tells_tokenizers_apart(model_dir, tmp_path):
    import shutil
    spec = ModelSpec.load(model_dir)
    other = tmp_path / "model"
    shutil.copytree(spec.path, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["normalizer"]["strip_accents"] = False
    (other / "tokenizer.json").write_text(json.dumps(tok))
    a = HFTokenizer.from_model_dir(spec.path, 256).fingerprint()
    b = HFTokenizer.from_model_dir(other, 256).fingerprint()
    assert a != b
    # Padding and truncation settings are overridden by the backend, so they do not count.
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["normalizer"]["strip_accents"] = None
    tok["padding"] = None
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert HFTokenizer.from_model_dir(other, 256).fingerprint() == a


def test_incomplete_token_dir_and_bad_rows(tmp_path, corpus):
    tok = tmp_path / "tok"
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "text": "fine"}, {"id": "b", "text": 3}])
    proc = run_cli("tokenize", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tok))
    assert proc.returncode == 3 and "bad.jsonl" in proc.stderr and "row 1 (id 'b')" in proc.stderr
    assert not (tok / "_SUCCESS").exists()
    proc = run_cli("run", "--input", str(tok), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"token directory {tok} is incomplete" in proc.stderr
    # Skipping records the bad row in the token directory's rejects; the shards hold the rest.
    proc = run_cli("tokenize", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tok), "--on-invalid",
                   "skip", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    rejects = [json.loads(line) for line in (tok / "_rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1] and set(read_token_dir(tok)) == {"a"}
    (tok / "_SUCCESS").unlink()
    proc = run_cli("run", "--input", str(tok), "--output", str(tmp_path / "out2"))
    assert proc.returncode == 2 and f"token directory {tok} is incomplete" in proc.stderr


def test_tokenize_job_resumes_after_a_stop(tmp_path, corpus):
    """A token directory uses the same ledger as an embedding output: rerunning skips committed units."""
    tok = tmp_path / "tok"
    args = ("tokenize", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--output", str(tok),
            "--unit-rows", "30")
    assert run_cli(*args).returncode == 0
    ledger = (tok / "_ledger.jsonl").read_text().splitlines()
    # Forget the last committed unit, as if the job had died right before committing it, and delete _SUCCESS.
    (tok / "_ledger.jsonl").write_text("\n".join(ledger[:-1]) + "\n")
    (tok / "_SUCCESS").unlink()
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tok)
    assert manifest["units_resumed"] == len(ledger) - 2 and manifest["rows_written"] == len(corpus)
    assert len(read_token_dir(tok)) == len(corpus)
    np.testing.assert_equal(sorted(read_token_dir(tok)), sorted(corpus))


def test_token_directory_rows_and_manifest_are_validated(tmp_path, model_dir, st_model):
    """A token directory is input like any other: rows no encoder may take are rejectable rows naming the shard
    and row, and its manifest may not name files outside it."""
    tok = tmp_path / "tok"
    rows = [{"id": f"t{k}", "text": f"token row {k}"} for k in range(6)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert run_cli("tokenize", "--input", str(tmp_path / "in.jsonl"), "--output", str(tok)).returncode == 0
    shard = sorted(tok.glob("tokens-*.arrow"))[0]
    table = pa.ipc.open_file(pa.BufferReader(shard.read_bytes())).read_all()     # not mapped: rewritten below
    good = table.column("input_ids").to_pylist()
    tokens = [good[0], [101, 40000, 102], [], None, [101] + [2000] * 300 + [102], good[5]]
    schema = table.schema
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(pa.table({"id": table.column("id"), "input_ids": pa.array(tokens, pa.list_(pa.int32()))},
                                    schema=schema))
    failed = run_cli("run", "--input", str(tok), "--output", str(tmp_path / "out"))
    assert failed.returncode == 3 and f"{shard} row 1 (id 't1')" in failed.stderr
    assert "token id 40000 is outside the model's vocabulary" in failed.stderr and "Traceback" not in failed.stderr
    skipped = run_cli("run", "--input", str(tok), "--output", str(tmp_path / "out"), "--on-invalid", "skip",
                      "--overwrite")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    reasons = {r["row"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "_rejects.jsonl").open())}
    assert set(reasons) == {1, 2, 3, 4}
    assert "empty" in reasons[2] and "null" in reasons[3] and "more than the model's maximum of 256" in reasons[4]
    got = read_manifest(tmp_path / "out")
    assert got["rows_written"] == 2 and got["rejected_rows"] == 4
    # A manifest that names a file outside its directory is refused before anything is read.
    manifest = json.loads((tok / "_manifest.json").read_text())
    manifest["shards"][0]["path"] = "../in.jsonl"
    (tok / "_manifest.json").write_text(json.dumps(manifest))
    outside = run_cli("run", "--input", str(tok), "--output", str(tmp_path / "out3"))
    assert outside.returncode == 2 and "'../in.jsonl', which is not a shard inside the directory" in outside.stderr
