"""Each distinct text embedded once (issue 21): repeats across files, tokenizer ranks and encoder ranks are written
with a copy of their text's embedding under their own ids; a kill -9 and resume stays exactly-once; --reuse takes
an earlier output's embeddings for unchanged texts and refuses an output it cannot trust. Real mpiexec worlds of
two tokenizer and two encoder ranks, so claims and references cross ranks both ways."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from .conftest import (EDGE_TEXTS, assert_complete_output, mpirun, needs_mpi,
                       read_output, reference, run_cli, write_corpus)
from .test_resume import kill_after_commits

pytestmark = needs_mpi

# 5 ranks: the conductor, 2 tokenizer ranks, 2 encoder ranks (CPU); small units and chunks, so that a repeat's
# first claim is often in flight on another rank when the repeat is claimed.
ARGS = ["--tokenizer-ranks", "2", "--unit-rows", "40", "--chunk-rows", "16", "--dedup", "on"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, st_model):
    """600 rows over 4 files, about half of them repeats of others drawn at random (edge texts among them), and
    sentence-transformers' embedding of every row."""
    rng = np.random.default_rng(21)
    words = ["grid", "node", "batch", "token", "shard", "rank", "queue", "model", "vector", "commit", "雨", "🙂"]
    distinct = EDGE_TEXTS + [" ".join(rng.choice(words, size=int(rng.integers(2, 30)))) for _ in range(300)]
    distinct = list(dict.fromkeys(distinct))
    texts = {f"r{k:04d}": distinct[k] if k < len(distinct) else distinct[int(rng.integers(len(distinct)))]
             for k in range(600)}
    order = rng.permutation(list(texts))
    texts = {k: texts[k] for k in order}
    root, expected = write_corpus(tmp_path_factory.mktemp("dedup-corpus"), texts, 4, st_model)
    return root, texts, expected


def _repeats(texts: dict[str, str]) -> int:
    return len(texts) - len(set(texts.values()))


def test_each_distinct_text_is_encoded_once_and_every_id_gets_its_own_row(corpus, tmp_path):
    root, texts, expected = corpus
    out = tmp_path / "out"
    proc = mpirun(5, "--input", str(root), "--output", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = assert_complete_output(out, expected)        # each id once, each within 1e-4 of ST
    assert manifest["dedup"]["on"] and manifest["rows_deduplicated"] == _repeats(texts) > 250
    encoders = [r for r in manifest["ranks"] if r["role"] == "encoder"]
    assert len(encoders) == 2 and all(r["rows_deduplicated"] > 0 for r in encoders)
    got = read_output(out)
    by_text: dict[str, list[str]] = {}
    for row_id, text in texts.items():
        by_text.setdefault(text, []).append(row_id)
    # A repeat carries its first's embedding, bit for bit.
    assert all((got[ids[0]] == got[i]).all() for ids in by_text.values() for i in ids[1:])
    # Only distinct texts reached an encoder: the tokens encoded are those of the distinct texts.
    off = tmp_path / "off"
    proc = run_cli("run", "--input", str(root), "--output", str(off), "--progress", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = assert_complete_output(off, expected)
    assert not plain["dedup"]["on"] and "rows_deduplicated" not in plain       # off by default
    assert manifest["tokens"] < 0.6 * plain["tokens"]


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_kill_9_and_resume_with_dedup_stay_exactly_once(corpus, tmp_path):
    root, texts, expected = corpus
    small = [*ARGS, "--max-batch-tokens", "256", "--window-batches", "2"]
    # A unit whose repeats refer to rows of later units commits only once those are encoded, so commits come in
    # bursts and the kill can land after the last one (once in CI). Try again, in a fresh directory, until it
    # lands mid-job: the resume below must start from a partial output.
    for attempt in range(3):
        out = tmp_path / f"out-{attempt}"
        killed_at = kill_after_commits(5, ["--input", str(root), "--output", str(out), *small], out,
                                       tmp_path / f"kill-{attempt}.log", 5)
        if killed_at < 15:
            break
    again = mpirun(5, "--input", str(root), "--output", str(out), *small)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    assert 5 <= manifest["units_resumed"] <= killed_at < 15
    # The resumed run starts with empty digest tables: it deduplicates among the rows it reads.
    assert manifest["rows_deduplicated"] > 0


def _changed(root, texts: dict[str, str], tmp_path, st_model):
    """The corpus with every 10th row's text changed and 30 rows added: (directory, texts, expected)."""
    changed = {i: (t + " (revised)" if k % 10 == 0 else t) for k, (i, t) in enumerate(texts.items())}
    changed.update({f"new{k}": f"an added row about shard {k} and rank {k % 7}" for k in range(30)})
    new_root, expected = write_corpus(tmp_path / "v2", changed, 4, st_model)
    return new_root, changed, expected


def test_reuse_encodes_only_what_changed(corpus, tmp_path, st_model):
    root, texts, _ = corpus
    first = tmp_path / "v1-out"
    proc = mpirun(5, "--input", str(root), "--output", str(first), *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "v2").mkdir()
    new_root, changed, expected = _changed(root, texts, tmp_path, st_model)
    out = tmp_path / "v2-out"
    proc = mpirun(5, "--input", str(new_root), "--output", str(out), "--reuse", str(first), *ARGS[:-2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    old = set(texts.values())
    unchanged = sum(1 for t in changed.values() if t in old)
    assert manifest["rows_reused"] == unchanged
    assert manifest["rows_reused"] + manifest["rows_deduplicated"] + \
        len({t for t in changed.values() if t not in old}) == len(changed)
    assert manifest["dedup"]["reuse"] == [str(first)] and manifest["dedup"]["reuse_shards_ignored"] == 0
    # A damaged shard of the earlier output is left out, with a warning; the job is still right.
    shard = sorted(first.glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = tmp_path / "v2-again"
    proc = mpirun(5, "--input", str(new_root), "--output", str(again), "--reuse", str(first), *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left out" in proc.stderr and shard.name in proc.stderr
    damaged = assert_complete_output(again, expected)
    assert damaged["dedup"]["reuse_shards_ignored"] == 1 and damaged["rows_reused"] < manifest["rows_reused"]


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_reuse_refuses_outputs_it_cannot_trust(corpus, tmp_path, model_dir):
    root, texts, _ = corpus
    small = tmp_path / "small"
    small.mkdir()
    for f in sorted(root.glob("*.jsonl"))[:1]:
        shutil.copy(f, small)
    outputs = {}
    for name, options in (("dims", ["--dimensions", "128"]), ("int8", ["--output-dtype", "int8"]), ("ok", [])):
        outputs[name] = tmp_path / name
        proc = run_cli("run", "--input", str(small), "--output", str(outputs[name]), "--model", model_dir,
                       "--progress", "off", *options)
        assert proc.returncode == 0, proc.stderr[-2000:]
    incomplete = tmp_path / "incomplete"
    shutil.copytree(outputs["ok"], incomplete)
    (incomplete / "_SUCCESS").unlink()
    manifest = json.loads((outputs["ok"] / "_manifest.json").read_text())
    assert manifest["row_digest"]["of"] == "text"           # any output can be reused later
    cases = {"dims": "dimensions", "int8": "stored as int8", "incomplete": "not complete",
             "tokens": "not an hpcembed output"}
    for name, why in cases.items():
        reuse = outputs.get(name, tmp_path / name)
        proc = run_cli("run", "--input", str(small), "--output", str(tmp_path / f"out-{name}"), "--model",
                       model_dir, "--progress", "off", "--reuse", str(reuse))
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert not (tmp_path / f"out-{name}" / "_SUCCESS").exists()
    proc = run_cli("run", "--input", str(small), "--output", str(outputs["ok"]), "--model", model_dir,
                   "--progress", "off", "--overwrite", "--reuse", str(outputs["ok"]))
    assert proc.returncode == 2 and "own output" in proc.stderr, proc.stderr
    proc = run_cli("run", "--input", str(small), "--output", str(tmp_path / "no-dedup"), "--model", model_dir,
                   "--progress", "off", "--dedup", "off", "--reuse", str(outputs["ok"]))
    assert proc.returncode == 2 and "drop --dedup off" in proc.stderr, proc.stderr
    proc = run_cli("run", "--input", str(small), "--output", str(tmp_path / "chunked"), "--model", model_dir,
                   "--progress", "off", "--chunk-tokens", "64", "--dedup", "on")
    assert proc.returncode == 2 and "chunked" in proc.stderr, proc.stderr


def test_a_full_digest_table_only_stops_deduplicating(corpus, tmp_path, st_model):
    root, texts, expected = corpus
    out = tmp_path / "out"
    # About 40 digests' worth: once reached, later texts are encoded without being recorded.
    proc = run_cli("run", "--input", str(root), "--output", str(out), "--dedup", "on", "--dedup-memory", "0.000005",
                   "--progress", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = assert_complete_output(out, expected)
    assert manifest["ranks"][0]["dedup_full"] and 0 <= manifest["rows_deduplicated"] < _repeats(texts) // 2
    np.testing.assert_allclose(read_output(out)["r0000"], reference(st_model, [texts["r0000"]])[0], atol=1e-4)
