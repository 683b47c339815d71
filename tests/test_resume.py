"""Checkpoint/resume and faults, on real mpiexec worlds: kill -9 of the whole job at seeded points, a rank
killed alone, a graceful SIGUSR1 stop, a directory of a different job, and a corrupt Parquet file mid-corpus.
Every rerun must end with the uninterrupted run's output: the same ids, each once, the same embeddings."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import (BackgroundJob, assert_complete_output, mpirun, needs_mpi, read_manifest, read_output, reference,
                       run_cli, write_corpus, write_jsonl)

pytestmark = needs_mpi

# A small batch window, so the encoder rank holds only ~20 rows in flight and a stop or kill lands mid-corpus.
ARGS = ["--tokenizer-ranks", "2", "--unit-rows", "20", "--chunk-rows", "10", "--max-batch-tokens", "256",
        "--window-batches", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, st_model):
    """4 JSONL files, 480 rows, 24 work units; and sentence-transformers' embeddings of every row."""
    rng = np.random.default_rng(7)
    words = ["grid", "node", "batch", "token", "shard", "rank", "queue", "model", "vector", "commit", "雨", "🙂"]
    texts = {f"r{k:04d}": " ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for k in range(480)}
    root, expected = write_corpus(tmp_path_factory.mktemp("corpus"), texts, 4, st_model)
    return root, texts, expected


def committed_units(out: Path) -> int:
    try:
        lines = (out / "_ledger.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return sum(1 for line in lines if '"kind": "unit"' in line)


def wait_for_commits(job: BackgroundJob, out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while committed_units(out) < count:
        assert job.proc.poll() is None, f"job ended early (rc {job.proc.returncode}):\n{job.text()[-3000:]}"
        assert time.monotonic() < deadline, f"fewer than {count} units committed in {timeout} s"
        time.sleep(0.02)


def kill_after_commits(ranks: int, args: list[str], out: Path, log: Path, count: int) -> int:
    """Start the job and kill -9 every process of it once `count` units are committed; returns the units committed
    by then."""
    job = BackgroundJob.mpi(ranks, args, log)
    try:
        job.wait_for(r"role map")
        wait_for_commits(job, out, count)
        job.kill_tree()                     # every process of the job, at once: a node lost, scancel -9
        job.wait(30)
    finally:
        job.stop()
    return committed_units(out)


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_kill_9_at_seeded_points_then_resume(corpus, tmp_path):
    root, texts, expected = corpus
    rng = np.random.default_rng(2026)
    # Early (before any unit is committed), middle and late, by committed units out of 24.
    points = [0, int(rng.integers(6, 10)), int(rng.integers(14, 19))]
    resumed = []
    for point in points:
        out = tmp_path / f"out-{point}"
        killed_at = kill_after_commits(4, ["--input", str(root), "--output", str(out), *ARGS], out,
                                       tmp_path / f"kill-{point}.log", point)
        again = mpirun(4, "--input", str(root), "--output", str(out), *ARGS)
        assert again.returncode == 0, again.stderr[-3000:]
        manifest = assert_complete_output(out, expected)
        if "already holds the complete output" in again.stderr:
            resumed.append(None)            # the kill came after _SUCCESS: the rerun rightly did nothing
            continue
        assert manifest["units_resumed"] <= killed_at
        assert manifest["rows_resumed"] + manifest["rows_written_this_run"] == len(texts)
        resumed.append(manifest["units_resumed"])
    # The early kill resumed nothing, and a later one really resumed committed work.
    assert resumed[0] == 0 and any(r for r in resumed[1:]), resumed


@pytest.mark.parametrize("role", ["encoder", pytest.param("tokenizer", marks=pytest.mark.slow)])
def test_dead_rank_ends_the_job_and_the_rerun_completes(corpus, tmp_path, role):
    root, texts, expected = corpus
    out = tmp_path / "out"
    job = BackgroundJob.mpi(4, ["--input", str(root), "--output", str(out), *ARGS], tmp_path / "job.log")
    try:
        line = job.wait_for(rf"rank \d+ on \S+ \(pid \d+\): {role}")
        rank = int(line.split()[1])
        wait_for_commits(job, out, 3)
        victim = job.rank_pid(rank)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        rc = job.wait(45)
        assert rc != 0 and time.monotonic() - killed < 30, (rc, job.text()[-2000:])
    finally:
        job.stop()
    assert not (out / "_SUCCESS").exists()
    again = mpirun(4, "--input", str(root), "--output", str(out), *ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    assert manifest["units_resumed"] >= 3


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, st_model):
    """3,000 short rows in 3 files, 12 units of 250: long enough on CPU that the sub-conductors send several
    batches of commits (every 0.5 s) before the job ends."""
    rng = np.random.default_rng(11)
    words = ["grid", "node", "batch", "token", "shard", "rank", "queue", "model", "vector", "commit"]
    texts = {f"s{k:05d}": " ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for k in range(3000)}
    root, expected = write_corpus(tmp_path_factory.mktemp("long"), texts, 3, st_model)
    return root, texts, expected


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_a_dead_sub_conductor_ends_the_job_and_the_rerun_completes(long_corpus, tmp_path):
    """Two pretend nodes (world.virtual_host) of an encoder rank, tokenizer ranks and a sub-conductor each, as a
    job of hundreds of nodes runs. A sub-conductor killed mid-job ends the job, the units whose commits it still
    held are not taken as done, and a rerun through sub-conductors gives every id once."""
    root, texts, expected = long_corpus
    out = tmp_path / "out"
    args = ["--input", str(root), "--output", str(out), "--unit-rows", "250", "--chunk-rows", "50",
            "--tokenizer-ranks", "4", "--sub-conductors", "per-node"]
    two_nodes = {"HPCEMBED_VIRTUAL_NODES": "2"}
    job = BackgroundJob.mpi(7, args, tmp_path / "job.log", env=two_nodes)
    try:
        line = job.wait_for(r"rank \d+ on \S+ \(pid \d+\): subconductor")
        assert "2 sub-conductor, 2 tokenizer, 2 encoder ranks" in job.wait_for(r"role map: .*")
        wait_for_commits(job, out, 3)
        killed = time.monotonic()
        os.kill(job.rank_pid(int(line.split()[1])), signal.SIGKILL)
        rc = job.wait(45)
        assert rc != 0 and time.monotonic() - killed < 30, (rc, job.text()[-2000:])
    finally:
        job.stop()
    assert not (out / "_SUCCESS").exists()
    again = mpirun(7, *args, env=two_nodes)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    assert 3 <= manifest["units_resumed"] < 12
    subs = [r for r in manifest["ranks"] if r["role"] == "subconductor"]
    # The sub-conductors committed the rest of the job between them, in fewer messages than units.
    assert len(subs) == 2 and sum(s["units_committed"] for s in subs) == 12 - manifest["units_resumed"], subs
    assert all(0 < s["commit_batches"] <= s["units_committed"] for s in subs), subs


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_sigusr1_stops_gracefully_and_the_rerun_completes(tmp_path, st_model):
    # Larger than the shared corpus: the tokenizers must still be reading when the signal comes (rows embedded
    # early wait in memory until their unit is complete, so commits lag reading).
    texts = {f"s{k:05d}": f"row {k} of the signal test " + "word " * (k % 23) for k in range(2400)}
    root = tmp_path / "in"
    root.mkdir()
    write_jsonl(root / "big.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    ids = sorted(texts)
    expected = dict(zip(ids, reference(st_model, [texts[i] for i in ids])))
    out = tmp_path / "out"
    job = BackgroundJob.mpi(4, ["--input", str(root), "--output", str(out), *ARGS], tmp_path / "job.log")
    try:
        job.wait_for(r"role map")
        wait_for_commits(job, out, 2)
        signalled = time.monotonic()
        job.proc.send_signal(signal.SIGUSR1)     # mpiexec passes it to every rank, as srun does
        rc = job.wait(90)
        took = time.monotonic() - signalled
    finally:
        job.stop()
    assert rc == 75 and took < 60, (rc, took, job.text()[-3000:])
    assert "SIGUSR1 received" in job.text() and "rerun the same command to resume" in job.text()
    manifest = read_manifest(out)
    assert manifest["stopped_early"] == "SIGUSR1" and not manifest["complete"] and not (out / "_SUCCESS").exists()
    stopped_rows = manifest["rows_written"]
    assert 0 < stopped_rows < len(texts)
    # What the stopped run reports is exactly what is committed in shards.
    assert stopped_rows == sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet"))
    again = mpirun(4, "--input", str(root), "--output", str(out), *ARGS)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    assert manifest["rows_resumed"] == stopped_rows


def test_a_different_job_is_refused_and_a_complete_one_is_a_no_op(corpus, tmp_path):
    root, texts, expected = corpus
    out = tmp_path / "out"
    first = mpirun(4, "--input", str(root / "part0.jsonl"), "--output", str(out), *ARGS)
    assert first.returncode == 0, first.stderr[-3000:]
    other_inputs = mpirun(4, "--input", str(root), "--output", str(out), *ARGS)
    assert other_inputs.returncode == 2 and "different job" in other_inputs.stderr
    assert "inputs" in other_inputs.stderr and "--overwrite" in other_inputs.stderr
    other_model = run_cli("run", "--input", str(root / "part0.jsonl"), "--output", str(out), "--max-seq-length",
                          "64", "--unit-rows", "20")
    assert other_model.returncode == 2 and "max_seq_length (256 then, 64 now)" in other_model.stderr
    same = mpirun(4, "--input", str(root / "part0.jsonl"), "--output", str(out), *ARGS)
    assert same.returncode == 0 and "already holds the complete output" in same.stderr


def _corrupt_parquet(path: Path, rows: list[dict]) -> None:
    """A Parquet file whose footer reads but whose data pages do not decompress."""
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd", row_group_size=10)
    data = bytearray(path.read_bytes())
    for k in range(40, len(data) // 2, 7):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def test_corrupt_parquet_mid_corpus(tmp_path, st_model):
    src = tmp_path / "in"
    src.mkdir()
    texts = {}
    for name in ("a", "b", "c"):
        rows = [{"id": f"{name}{k}", "text": f"{name} row {k} " + "word " * (k % 9)} for k in range(40)]
        if name == "b":
            _corrupt_parquet(src / "b.parquet", rows)
            continue
        pq.write_table(pa.Table.from_pylist(rows), src / f"{name}.parquet", row_group_size=10)
        texts.update({r["id"]: r["text"] for r in rows})
    out = tmp_path / "out"
    failed = mpirun(4, "--input", str(src), "--output", str(out), *ARGS)
    assert failed.returncode == 3 and "b.parquet" in failed.stderr and "cannot read rows" in failed.stderr, \
        failed.stderr[-3000:]
    kept = committed_units(out)
    kept_shards = {p.name for p in out.glob("part-*.parquet")}
    # The rerun with --on-invalid skip resumes what was committed, rejects the file, and embeds the rest.
    again = mpirun(4, "--input", str(src), "--output", str(out), *ARGS, "--on-invalid", "skip")
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["units_resumed"] == kept and kept_shards <= {p.name for p in out.glob("part-*.parquet")}
    assert manifest["complete"] and manifest["rejected_rows"] == 40 and manifest["rows_written"] == 80
    rejects = [json.loads(line) for line in (out / "_rejects.jsonl").read_text().splitlines()]
    assert rejects and all(r["file"].endswith("b.parquet") for r in rejects)
    got = read_output(out)
    ids = sorted(texts)
    ref = reference(st_model, [texts[i] for i in ids])
    assert set(got) == set(texts) and min(float(got[i] @ r) for i, r in zip(ids, ref)) >= 0.9999
