"""Inputs on object storage: the same job from a local directory and from s3:// on a real S3-compatible server
(moto in server mode, tests/s3_server.py) gives the same ids and the same embeddings, resumes and refuses
changed inputs like a local one, survives kill -9 exactly once, and names what is wrong."""
from __future__ import annotations

import gzip
import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from .conftest import (MPI_ENV, MPIEXEC, BackgroundJob, assert_complete_output, mpirun, needs_mpi, read_manifest,
                       run_cli, write_corpus, write_jsonl)
from .s3_server import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


def _corpus(root):
    """One file of every format, in a directory tree; JSONL long enough to be cut into several units."""
    (root / "sub").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", [{"text": f"object store row {k} " * (1 + k % 4)} for k in range(45)])
    pq.write_table(pa.table({"text": [f"parquet row {k}" for k in range(12)], "id": [f"p{k}" for k in range(12)]}),
                   root / "sub" / "b.parquet", row_group_size=5)
    (root / "sub" / "c.csv").write_text("text\n" + "".join(f"\"csv, row {k}\"\n" for k in range(7)))
    with gzip.open(root / "d.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"text": f"gzipped row {k}"}) + "\n" for k in range(6)))
    (root / "e.txt").write_text("".join(f"plain line {k}\n" for k in range(5)))
    return root


def _embeddings(out) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out), format="parquet").to_table()
    return dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False)))


def test_an_s3_prefix_is_the_same_job_as_the_local_directory(tmp_path, s3):
    local = _corpus(tmp_path / "corpus")
    s3.upload(local, "bucket", "corpus")
    args = ["--unit-rows", "20", "--progress", "off"]
    assert run_cli("run", "--input", str(local), "--output", str(tmp_path / "local"), *args).returncode == 0
    url = "s3://bucket/corpus/"
    # As an MPI job: the conductor plans from the store, each tokenizer rank reads its units from it.
    proc = mpirun(4, "--input", url, "--output", str(tmp_path / "s3"), "--tokenizer-ranks", "2", *args, env=s3.env) \
        if MPIEXEC else run_cli("run", "--input", url, "--output", str(tmp_path / "s3"), *args, env=s3.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = _embeddings(tmp_path / "local"), _embeddings(tmp_path / "s3")
    assert set(got) == set(want) and len(got) == 45 + 12 + 7 + 6 + 5
    assert "sub/c:0" in got and "a:44" in got                  # generated ids: the path within the input
    assert max(float(np.abs(got[i] - want[i]).max()) for i in want) < 1e-6
    manifest = read_manifest(tmp_path / "s3")
    assert manifest["complete"] and {i["path"] for i in manifest["inputs"]} >= {"s3://bucket/corpus/a.jsonl"}
    assert len(manifest["settings"]["unit_sizes"]) > 1
    # A rerun finds the job complete; an object rewritten in place is another job, as a local file would be.
    again = run_cli("run", "--input", url, "--output", str(tmp_path / "s3"), *args, env=s3.env)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    s3.put("bucket", "corpus/e.txt", b"plain line changed\n")
    changed = run_cli("run", "--input", url, "--output", str(tmp_path / "s3"), *args, env=s3.env)
    assert changed.returncode == 2 and "differs in inputs" in changed.stderr and "s3://bucket/corpus/e.txt" in \
        changed.stderr


@pytest.mark.parametrize("url, message", [
    ("s3://bucket/nothing-here/", "does not exist"),
    ("s3://bucket/corpus/a.jsonl?access_key=AKIA&secret_key=x", "credentials in a URL"),
])
def test_bad_urls_are_named(tmp_path, s3, url, message):
    s3.make_bucket("bucket")
    proc = run_cli("run", "--input", url, "--output", str(tmp_path / "out"), "--progress", "off", env=s3.env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "secret_key=x" not in proc.stderr


@needs_mpi
def test_kill_9_and_resume_from_the_store(tmp_path, s3, st_model):
    texts = {f"k{k:03d}": f"killed and resumed from the object store, row {k} " * (1 + k % 5) for k in range(160)}
    (tmp_path / "corpus").mkdir()
    root, expected = write_corpus(tmp_path / "corpus", texts, 4, st_model)
    s3.upload(root, "bucket", "kill")
    out = tmp_path / "out"
    # A small batch window, so the kill lands mid-corpus (as in test_resume.py).
    args = ["--input", "s3://bucket/kill/", "--output", str(out), "--tokenizer-ranks", "2", "--unit-rows", "10",
            "--chunk-rows", "5", "--max-batch-tokens", "256", "--window-batches", "2"]
    job = BackgroundJob([MPIEXEC, "-n", "4", sys.executable, "-m", "hpcembed", "run", *args, "--progress", "log"],
                        tmp_path / "killed.log", {**MPI_ENV, **s3.env})
    try:
        deadline = time.monotonic() + 120
        while _committed(out) < 3:
            assert job.proc.poll() is None, job.text()[-3000:]
            assert time.monotonic() < deadline, "no 3 units committed in 120 s"
            time.sleep(0.02)
        job.kill_tree()
        job.wait(30)
    finally:
        job.stop()
    killed_at = _committed(out)
    assert killed_at < 16 and not (out / "_SUCCESS").exists()
    again = mpirun(4, *args, env=s3.env)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    assert 3 <= manifest["units_resumed"] <= killed_at


def _committed(out) -> int:
    try:
        return sum('"kind": "unit"' in line for line in (out / "_ledger.jsonl").read_text().splitlines())
    except OSError:
        return 0
