"""Inputs and outputs on object storage: the same job from a local directory and from s3:// on a real S3-compatible
server (moto in server mode, tests/s3_server.py) gives the same ids and the same embeddings, writes its output
there, resumes and refuses changed inputs like a local one, survives kill -9 exactly once with its ledger on the
store, keeps a second job out of the same prefix, and names what is wrong."""
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


def _embeddings(out, filesystem=None) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out), format="parquet", filesystem=filesystem).to_table()
    return dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False)))


def test_an_s3_prefix_is_the_same_job_as_the_local_directory(tmp_path, s3):
    local = _corpus(tmp_path / "corpus")
    s3.upload(local, "bucket", "corpus")
    args = ["--unit-rows", "20", "--progress", "off"]
    assert run_cli("run", "--input", str(local), "--output", str(tmp_path / "local"), *args).returncode == 0
    url, out = "s3://bucket/corpus/", "s3://bucket/embedded"
    # As an MPI job: the conductor plans from the store, each tokenizer rank reads its units from it, and each
    # encoder rank writes its shards to it.
    proc = mpirun(4, "--input", url, "--output", out, "--tokenizer-ranks", "2", *args, env=s3.env) \
        if MPIEXEC else run_cli("run", "--input", url, "--output", out, *args, env=s3.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = s3.download("bucket", "embedded", tmp_path / "s3")
    assert "_lock" not in {p.name for p in stored.iterdir()} and (stored / "_SUCCESS").exists()
    want, got = _embeddings(tmp_path / "local"), _embeddings(stored)
    assert set(got) == set(want) and len(got) == 45 + 12 + 7 + 6 + 5
    assert "sub/c:0" in got and "a:44" in got                  # generated ids: the path within the input
    assert max(float(np.abs(got[i] - want[i]).max()) for i in want) < 1e-6
    manifest = read_manifest(stored)
    assert manifest["complete"] and {i["path"] for i in manifest["inputs"]} >= {"s3://bucket/corpus/a.jsonl"}
    assert len(manifest["settings"]["unit_sizes"]) > 1
    checked = run_cli("verify", out, "--input", url, env=s3.env)
    assert checked.returncode == 0 and "75 rows" in checked.stderr and "OK" in checked.stderr, checked.stderr
    # A rerun finds the job complete; an object rewritten in place is another job, as a local file would be.
    again = run_cli("run", "--input", url, "--output", out, *args, env=s3.env)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    s3.put("bucket", "corpus/e.txt", b"plain line changed\n")
    changed = run_cli("run", "--input", url, "--output", out, *args, env=s3.env)
    assert changed.returncode == 2 and "differs in inputs" in changed.stderr and "s3://bucket/corpus/e.txt" in \
        changed.stderr
    inside = run_cli("run", "--input", url, "--output", url + "out", *args, env=s3.env)
    assert inside.returncode == 2 and "inside input" in inside.stderr


@pytest.mark.parametrize("url, message", [
    ("s3://bucket/nothing-here/", "does not exist"),
    ("s3://bucket/corpus/a.jsonl?access_key=AKIA&secret_key=x", "credentials in a URL"),
    ("output s3://no-such-bucket/out", "bucket no-such-bucket does not exist"),
])
def test_bad_urls_are_named(tmp_path, s3, url, message):
    s3.make_bucket("bucket")
    (tmp_path / "in.txt").write_text("one line\n")
    where = ["--input", str(tmp_path / "in.txt"), "--output", url.split()[1]] if url.startswith("output ") else \
        ["--input", url, "--output", str(tmp_path / "out")]
    proc = run_cli("run", *where, "--progress", "off", env=s3.env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "secret_key=x" not in proc.stderr


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
@needs_mpi
def test_kill_9_and_resume_from_the_store(tmp_path, s3, st_model):
    texts = {f"k{k:03d}": f"killed and resumed from the object store, row {k} " * (1 + k % 5) for k in range(160)}
    (tmp_path / "corpus").mkdir()
    root, expected = write_corpus(tmp_path / "corpus", texts, 4, st_model)
    s3.upload(root, "bucket", "kill")
    # Input and output on the store. A small batch window, so the kill lands mid-corpus (as in test_resume.py).
    args = ["--input", "s3://bucket/kill/", "--output", "s3://bucket/kill-out", "--tokenizer-ranks", "2",
            "--unit-rows", "10",
            "--chunk-rows", "5", "--max-batch-tokens", "256", "--window-batches", "2"]
    job = BackgroundJob([MPIEXEC, "-n", "4", sys.executable, "-m", "hpcembed", "run", *args, "--progress", "log"],
                        tmp_path / "killed.log", {**MPI_ENV, **s3.env})
    try:
        deadline = time.monotonic() + 120
        while _committed(s3) < 1:          # the ledger's first segment: the next is up to 2 s away
            assert job.proc.poll() is None, job.text()[-3000:]
            assert time.monotonic() < deadline, "no unit committed in 120 s"
            time.sleep(0.02)
        job.kill_tree()
        job.wait(30)
    finally:
        job.stop()
    killed_at = _committed(s3)
    left = s3.objects("bucket", "kill-out")
    assert killed_at < 16 and "_SUCCESS" not in left and "_lock" in left     # a killed job cannot remove it
    # The dead job's lock names a pid on this host that is gone, so the rerun takes it over.
    again = mpirun(4, *args, env=s3.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "took over the lock" in again.stderr
    manifest = assert_complete_output(s3.download("bucket", "kill-out", tmp_path / "out"), expected)
    assert 1 <= manifest["units_resumed"] <= killed_at
    assert not any(n.startswith("_ledger.jsonl.1.") for n in s3.objects("bucket", "kill-out"))  # compacted


def _committed(s3) -> int:
    """Units in the ledger on the store: its first object and the segments of its generation."""
    return sum(data.count(b'"kind": "unit"') for data in s3.objects("bucket", "kill-out", "_ledger").values())


@pytest.fixture
def store_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3.make_bucket("bucket")
    return s3


def test_the_ledger_on_a_store_is_segments_read_in_order_and_compacted(store_env):
    from hpcembed.io.ledger import CommittedUnit, Ledger, LedgerState
    ledger = Ledger("s3://bucket/ledger-test")
    ledger.write_fresh(LedgerState({"job": 1}, [], {}))
    for unit in range(3):                # one segment each: the interval is not waited for at close
        ledger.commit_units([CommittedUnit(unit, {f"part-{unit}": 10}, 100)])
        ledger.close()
    names = set(store_env.objects("bucket", "ledger-test"))
    assert names == {"_ledger.jsonl", "_ledger.jsonl.1.00000001", "_ledger.jsonl.1.00000002",
                     "_ledger.jsonl.1.00000003"}
    # A segment after a gap was never acknowledged in order: it is not read.
    store_env.put("bucket", "ledger-test/_ledger.jsonl.1.00000005", b'{"kind": "unit", "unit": 9, "shards": {}, '
                  b'"tokens": 0}\n')
    state = Ledger("s3://bucket/ledger-test").load()
    assert sorted(state.units) == [0, 1, 2] and state.rows == 30
    # Compaction: the next generation's header holds every record, and no segment of the last one is left.
    again = Ledger("s3://bucket/ledger-test")
    again.write_fresh(again.load())
    assert set(store_env.objects("bucket", "ledger-test")) == {"_ledger.jsonl"}
    reread = Ledger("s3://bucket/ledger-test")
    assert sorted(reread.load().units) == [0, 1, 2] and reread.generation == 2


def test_segments_are_written_off_the_commit_path_in_order_and_a_failed_one_fails_the_job(store_env):
    """Rank 0 hands each segment write to the ledger's sync thread and goes on; the writes stay in order (no gap
    for a reader to stop at), and one that fails is raised at the next tick or at close, never passed over."""
    from hpcembed.io.ledger import SEGMENT_SECONDS, CommittedUnit, Ledger, LedgerState
    clock = [0.0]
    ledger = Ledger("s3://bucket/ledger-sync")
    ledger.clock = lambda: clock[0]
    ledger.write_fresh(LedgerState({"job": 1}, [], {}))
    for unit in range(6):
        clock[0] += SEGMENT_SECONDS
        ledger.commit_units([CommittedUnit(unit, {f"part-{unit}": 10}, 100)])
    ledger.close()
    segments = sorted(n for n in store_env.objects("bucket", "ledger-sync") if n != "_ledger.jsonl")
    assert len(segments) >= 2 and segments == [f"_ledger.jsonl.1.{k:08d}" for k in range(1, len(segments) + 1)]
    assert sorted(Ledger("s3://bucket/ledger-sync").load().units) == list(range(6))
    # Its bucket deleted under it: the write fails on the sync thread, and close says so.
    store_env.make_bucket("doomed")
    doomed = Ledger("s3://doomed/out")
    doomed.clock = lambda: clock[0]
    doomed.write_fresh(LedgerState({"job": 2}, [], {}))
    client = store_env.client()
    client.delete_object(Bucket="doomed", Key="out/_ledger.jsonl")
    client.delete_bucket(Bucket="doomed")
    clock[0] += SEGMENT_SECONDS
    doomed.commit_units([CommittedUnit(0, {"part-0": 10}, 100)])
    with pytest.raises(OSError):
        doomed.close()


def test_a_second_job_is_kept_out_of_a_prefix_in_use(store_env):
    from hpcembed.errors import ConfigError
    from hpcembed.io.lock import ObjectLock
    from hpcembed.io.store import open_dir
    first, second = ObjectLock(open_dir("s3://bucket/locked")), ObjectLock(open_dir("s3://bucket/locked"))
    first.acquire()
    with pytest.raises(ConfigError, match="in use by another hpcembed job"):
        second.acquire()              # a live process of this host holds it
    first.release()
    assert "_lock" not in store_env.objects("bucket", "locked")
    second.acquire()
    second.release()


def test_an_npy_output_on_a_store_is_checked_and_rewritten_like_a_local_one(store_env):
    from hpcembed.io.ids import id_digest
    from hpcembed.io.ledger import CommittedUnit, LedgerState
    from hpcembed.io.writer import OutputDir
    out = OutputDir("s3://bucket/npy-out", output_format="npy")
    shard = out.write_shard("part-00000001-r00001.parquet", pa.array(["a", "b", "c"]),
                            np.eye(3, 8, dtype=np.float32))
    state = LedgerState({}, [], {1: CommittedUnit(1, {"part-00000001-r00001.parquet": 3}, 9, files={
        "part-00000001-r00001.parquet": shard.record})})
    assert out.damaged(state) == {}
    removed, rewritten = out.drop_ids("part-00000001-r00001.parquet", {id_digest("b")})
    assert removed == ["b"] and rewritten.rows == 2
    assert "the ledger says" in out.damaged(state)[1]          # it describes the shard before the drop
    state.units[1].shards["part-00000001-r00001.parquet"] = 2            # as the drop record says
    state.units[1].files["part-00000001-r00001.parquet"] = rewritten.record
    assert out.damaged(state) == {}
    objects = store_env.objects("bucket", "npy-out")
    array = np.load(__import__("io").BytesIO(objects["part-00000001-r00001.npy"]))
    assert np.array_equal(array, np.eye(3, 8, dtype=np.float32)[[0, 2]])
