"""The CLI end to end on the real model: correctness row by row against sentence-transformers, every input
format, the manifest, and every kind of bad input."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcembed.errors import ConfigError

from .conftest import EDGE_TEXTS, read_manifest, read_output, reference, run_cli, write_jsonl


def assert_matches(out_dir, expected: dict[str, str], st_model, min_cos=0.9999):
    got = read_output(out_dir)
    assert set(got) == set(expected)
    ids = sorted(expected)
    ref = reference(st_model, [expected[i] for i in ids])
    cos = np.array([float(got[i] @ r) / np.linalg.norm(got[i]) / np.linalg.norm(r) for i, r in zip(ids, ref)])
    assert cos.min() >= min_cos, f"worst row {ids[int(cos.argmin())]!r}: cosine {cos.min()}"
    return got


def test_edge_cases_match_sentence_transformers(tmp_path, st_model, model_dir):
    texts = {f"e{k}": t for k, t in enumerate(EDGE_TEXTS)}
    write_jsonl(tmp_path / "edge.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    proc = run_cli("run", "--input", str(tmp_path / "edge.jsonl"), "--output", str(tmp_path / "out"),
                   "--chunk-rows", "5", "--max-batch-tokens", "1024")
    assert proc.returncode == 0, proc.stderr
    got = assert_matches(tmp_path / "out", texts, st_model)
    np.testing.assert_allclose(got["e4"], got["e5"], atol=1e-6)      # duplicate texts, different ids
    manifest = read_manifest(tmp_path / "out")
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert manifest["rows_written"] == len(texts) and manifest["inputs"][0]["rows"] == len(texts)
    assert manifest["dim"] == 384 and manifest["pooling"] == "mean" and manifest["normalize"] is True
    assert manifest["max_seq_length"] == 256 and len(manifest["ranks"]) == 1
    assert sum(s["rows"] for s in manifest["shards"]) == len(texts) and manifest["tokens_per_s"] > 0
    # Truncation is counted, and said once at the end.
    from hpcembed.tokenize.hf import load_tokenizer
    tok = load_tokenizer(model_dir)
    tok.no_truncation()
    tok.no_padding()
    longer = sum(len(e.ids) > 256 for e in tok.encode_batch(EDGE_TEXTS))
    assert longer >= 2 and manifest["texts_truncated"] == longer
    assert proc.stderr.count("were truncated; --chunk-tokens") == 1


def test_all_formats_in_one_job_with_toml_and_overrides(tmp_path, st_model):
    src = tmp_path / "in"
    src.mkdir()
    expected = {}
    pq.write_table(pa.table({"text": ["parquet one", "parquet two", "parquet three"], "doc": ["p1", "p2", "p3"],
                             "id": ["x", "y", "z"]}), src / "a.parquet", row_group_size=2)
    expected.update({"x": "parquet one", "y": "parquet two", "z": "parquet three"})
    write_jsonl(src / "b.jsonl", [{"text": "json line one"}, {"text": "json line two"}])
    expected.update({"b:0": "json line one", "b:1": "json line two"})
    with open(src / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        w.writerows([["c-1", "csv, with comma"], ["c-2", "csv\nwith newline"]])
    expected.update({"c-1": "csv, with comma", "c-2": "csv\nwith newline"})
    (src / "d.txt").write_text("plain text line\n\nlast line")
    expected.update({"d:0": "plain text line", "d:1": "", "d:2": "last line"})
    job = tmp_path / "job.toml"
    job.write_text(f'input = ["{src}"]\noutput = "{tmp_path / "wrong"}"\nunit-rows = 1\non_invalid = "fail"\n')
    proc = run_cli("run", "--config", str(job), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "wrong").exists()
    assert_matches(tmp_path / "out", expected, st_model)
    manifest = read_manifest(tmp_path / "out")
    assert [i["rows"] for i in manifest["inputs"]] == [3, 2, 2, 3]
    # Rerunning the same job on its finished directory is a no-op that says so; another job is refused.
    again = run_cli("run", "--config", str(job), "--output", str(tmp_path / "out"))
    assert again.returncode == 0 and "already holds the complete output" in again.stderr
    assert read_manifest(tmp_path / "out") == manifest
    other = run_cli("run", "--config", str(job), "--output", str(tmp_path / "out"), "--pooling", "cls")
    assert other.returncode == 2 and "different job" in other.stderr and "pooling ('mean' then, 'cls' now)" \
        in other.stderr and "--overwrite" in other.stderr


BAD_INPUTS = {
    "null text": ([{"id": "a", "text": "ok"}, {"id": "b", "text": None}], "row 1 (id 'b'): text 'text' is null"),
    "non-string text": ([{"id": "a", "text": 7}], "row 0 (id 'a'): text 'text' is a number, not a string"),
    "missing key": ([{"id": "a", "text": "ok"}, {"id": "b", "body": "x"}], "row 1 (id 'b'): no text key 'text'"),
    "duplicate id": ([{"id": "a", "text": "one"}, {"id": "b", "text": "two"}, {"id": "a", "text": "three"}],
                     "row 2 (id 'a'): duplicate id, first seen earlier in this file at row 0"),
    "invalid json": ([{"id": "a", "text": "ok"}, "{oops"], "row 1: invalid JSON"),
    "invalid utf-8": ([{"id": "a", "text": "ok"}, b'{"id": "b", "text": "\xc3\x28"}'], "row 1: invalid UTF-8"),
    # Legal JSON escapes that are not Unicode text: one such row must not crash a billion-row backfill.
    "lone surrogate in text": ([{"id": "a", "text": "ok"}, '{"id": "b", "text": "half \\ud800 pair"}'],
                               "row 1 (id 'b'): text 'text' holds a lone surrogate ('\\ud800') at character 5"),
    "lone surrogate in id": ([{"id": "a", "text": "ok"}, '{"id": "\\udc00b", "text": "fine"}'],
                             "row 1: id '\\udc00b' holds a lone surrogate at character 0"),
}


def _write_records(path, records):
    with open(path, "wb") as fh:
        for r in records:
            fh.write((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_error(tmp_path, case):
    records, message = BAD_INPUTS[case]
    _write_records(tmp_path / "bad.jsonl", records)
    proc = run_cli("run", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(tmp_path / "bad.jsonl") in errors[0] and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.mark.parametrize("kind", ["missing column", "corrupt parquet", "wrong type", "csv bad utf-8",
                                  "text bad utf-8", "missing file"])
def test_bad_files_fail_clearly(tmp_path, kind):
    path = tmp_path / "bad.parquet"
    if kind == "missing column":
        pq.write_table(pa.table({"body": ["x"]}), path)
        message = "bad.parquet: no text column 'text' (columns: body)"
    elif kind == "corrupt parquet":
        path.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
        message = "bad.parquet: cannot read parquet file"
    elif kind == "wrong type":
        pq.write_table(pa.table({"text": [1.5]}), path)
        message = "text column 'text' has type double, expected string"
    elif kind == "csv bad utf-8":
        path = tmp_path / "bad.csv"
        path.write_bytes(b"text\nfine\n\xff\xfe\n")
        message = "bad.csv row 1 (id 'bad:1'): invalid UTF-8"
    elif kind == "text bad utf-8":
        path = tmp_path / "bad.txt"
        path.write_bytes(b"fine\nfine too\n\xe2\x82\n")
        message = "bad.txt row 2: invalid UTF-8"
    else:
        path = tmp_path / "nope.parquet"
        message = "does not exist"
    proc = run_cli("run", "--input", str(path), "--output", str(tmp_path / "out"))
    assert proc.returncode in (2, 3) and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "_SUCCESS").exists()


def test_skip_mode_records_rejects_and_embeds_the_rest(tmp_path, st_model):
    _write_records(tmp_path / "mixed.jsonl", [
        {"id": "a", "text": "good one"}, {"id": "b", "text": None}, b'{"id": "c", "text": "\xff"}',
        {"id": "a", "text": "dup"}, {"id": "d", "text": "good two"}])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    proc = run_cli("run", "--input", str(tmp_path / "mixed.jsonl"), str(tmp_path / "broken.parquet"),
                   "--output", str(tmp_path / "out"), "--on-invalid", "skip")
    assert proc.returncode == 0, proc.stderr
    assert_matches(tmp_path / "out", {"a": "good one", "d": "good two"}, st_model)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "_rejects.jsonl").read_text().splitlines()]
    assert sorted((r["file"].rsplit("/", 1)[1], r["row"]) for r in rejects) == [
        ("broken.parquet", None), ("mixed.jsonl", 1), ("mixed.jsonl", 2), ("mixed.jsonl", 3)]
    assert all(r["reason"] for r in rejects)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["rejected_rows"] == 3 and manifest["rows_written"] == 2
    assert manifest["unreadable_files"] and (tmp_path / "out" / "_SUCCESS").exists()


def test_lone_surrogates_and_binary_ids_are_rejectable_rows(tmp_path, st_model):
    _write_records(tmp_path / "s.jsonl", [{"id": "a", "text": "good one"}, '{"id": "b", "text": "x \\udfff"}',
                                          '{"id": "\\ud83d", "text": "y"}', {"id": "d", "text": "good two"}])
    # Parquet ids stored as binary: UTF-8 ones are the ids, others are rejected rows (never a Python repr).
    pq.write_table(pa.table({"id": pa.array([b"B0", b"\xff\xfe", "Bé".encode()], pa.binary()),
                             "text": ["bin zero", "bin bad", "bin two"]}), tmp_path / "b.parquet")
    proc = run_cli("run", "--input", str(tmp_path / "s.jsonl"), str(tmp_path / "b.parquet"),
                   "--output", str(tmp_path / "out"), "--on-invalid", "skip")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert_matches(tmp_path / "out", {"a": "good one", "d": "good two", "B0": "bin zero", "Bé": "bin two"},
                   st_model)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "_rejects.jsonl").read_text().splitlines()]
    assert sorted((r["file"].rsplit("/", 1)[1], r["row"]) for r in rejects) == [
        ("b.parquet", 1), ("s.jsonl", 1), ("s.jsonl", 2)]
    assert any("invalid UTF-8 at byte 0 of the id" in r["reason"] for r in rejects), rejects
    assert sum("lone surrogate" in r["reason"] for r in rejects) == 2, rejects


def test_config_values_are_checked_not_coerced():
    from hpcembed.config import build_config
    base = {"input": ["x.jsonl"], "output": "out"}
    for wrong, message in [({"normalize": "false"}, "normalize must be true or false, got 'false'"),
                           ({"unit_rows": True}, "unit-rows must be an integer, got True"),
                           ({"input": ["a.jsonl", 3]}, "input must be a list of strings"),
                           ({"progress_interval": 0}, "progress-interval must be at least"),
                           ({"credits": 0}, "credits must be at least 1")]:
        with pytest.raises(ConfigError, match=message):
            build_config({**base, **wrong}, {})
    assert build_config({**base, "normalize": False, "progress_interval": 5}, {}).progress_interval == 5


@pytest.mark.parametrize("case", ["fifo input", "output inside input", "job file not utf-8", "bad device",
                                  "cuda without a gpu"])
def test_user_mistakes_are_exit_2_naming_what_to_fix(tmp_path, case):
    import os

    import torch
    data = tmp_path / "in"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"id": "a", "text": "one"}])
    args = ["--input", str(data), "--output", str(tmp_path / "out")]
    if case == "fifo input":
        os.mkfifo(tmp_path / "x.jsonl")                 # reading it would block forever
        args = ["--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "out")]
        message = "x.jsonl is not a regular file (a FIFO)"
    elif case == "output inside input":
        args = ["--input", str(data), "--output", str(data / "emb")]
        message = "is inside input directory"
    elif case == "job file not utf-8":
        (tmp_path / "job.toml").write_bytes(b"input = ['\xff']\n")
        args = ["--config", str(tmp_path / "job.toml"), "--output", str(tmp_path / "out")]
        message = "is not UTF-8 text"
    elif case == "bad device":
        args += ["--device", "gpu0"]
        message = "device must be auto, cpu, cuda or cuda:N; got 'gpu0'"
    else:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args += ["--device", "cuda"]
        message = "--device cuda: this machine has 0 usable CUDA device(s)"
    proc = run_cli("run", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (data / "emb").exists()


def test_usage_errors(tmp_path):
    proc = run_cli("run", "--input", str(tmp_path))
    assert proc.returncode == 2 and "no output directory" in proc.stderr
    (tmp_path / "job.toml").write_text("inptu = 'x'\n")
    proc = run_cli("run", "--config", str(tmp_path / "job.toml"))
    assert proc.returncode == 2 and "unknown key 'inptu'" in proc.stderr
    (tmp_path / "job.toml").write_text("input = ['x.jsonl']\noutput = 'o'\nnormalize = 'false'\n")
    proc = run_cli("run", "--config", str(tmp_path / "job.toml"))
    assert proc.returncode == 2 and "normalize must be true or false, got 'false'" in proc.stderr, proc.stderr
    assert "--text-column" in run_cli("run", "--help").stdout
    assert "run" in run_cli("--help").stdout


@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_damaged_model_weights_are_named(tmp_path, model_dir, damage):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>not found</html>" * 100)
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "a row"}])
    proc = run_cli("run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"),
                   "--model", str(model))
    assert proc.returncode == 2 and f"model weights {weights} are" in proc.stderr, proc.stderr[-2000:]
    assert ("truncated" if damage == "truncated" else "not safetensors") in proc.stderr
    assert "Traceback" not in proc.stderr
