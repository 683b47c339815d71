"""What an output directory guarantees. One job at a time (io/lock.py): a second job is refused with the holder's
name, a holder that is provably gone is taken over, and the lock goes with the job that held it. Completion is
verified, not assumed (io/writer.py): a rerun checks every shard against the size and checksum the ledger recorded
and redoes the units whose shards are missing or damaged."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hpcembed.errors import ConfigError
from hpcembed.io.lock import LOCK, STALE_SECONDS, OutputLock

from .conftest import BackgroundJob, MPIEXEC, assert_complete_output, needs_mpi, run_cli, write_corpus


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _corpus_dir(root):
    root.mkdir(parents=True)
    return root


def _write_lock(directory, **holder) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": None,
                                              "slurm_job": None, "acquired": time.time(), **holder}))


def test_a_live_holder_is_named_and_kept(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), slurm_job="4242")        # this very process: alive
    with pytest.raises(ConfigError, match=rf"in use by another hpcembed job \(pid {os.getpid()} on "
                                          rf"{socket.gethostname()}, Slurm job 4242"):
        OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["slurm_job"] == "4242"


def test_a_holder_that_is_gone_or_reused_is_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    lock = OutputLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()
    # The same pid, but another process than the one that took it (a reused pid): gone.
    _write_lock(tmp_path, pid=os.getpid(), started=-1.0)
    OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["started"] != -1.0


def test_a_zombie_holder_is_gone(tmp_path):
    """A rank killed outright is a zombie until something reaps it: its lock is taken over all the same."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:          # exited, not yet reaped (this process is its parent)
            with open(f"/proc/{proc.pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        os.kill(proc.pid, 0)                        # the signal alone still finds it
        _write_lock(tmp_path, pid=proc.pid)
        OutputLock(tmp_path).acquire()
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        proc.wait()


def test_another_hosts_lock_is_taken_over_only_when_stale(tmp_path):
    _write_lock(tmp_path, host="some-other-node", pid=1)
    with pytest.raises(ConfigError, match="pid 1 on some-other-node"):
        OutputLock(tmp_path).acquire()
    old = time.time() - STALE_SECONDS - 5
    os.utime(tmp_path / LOCK, (old, old))
    OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == socket.gethostname()


def test_release_leaves_a_lock_taken_over_by_another_job(tmp_path):
    lock = OutputLock(tmp_path)
    lock.acquire()
    _write_lock(tmp_path, host="some-other-node", pid=1)            # taken over while this job was stalled
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "some-other-node"


def test_refresh_touches_the_lock(tmp_path, monkeypatch):
    import hpcembed.io.lock as lock_module
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.0)
    lock = OutputLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK, (old, old))
    lock.refresh()
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 60


def test_second_job_on_the_same_output_is_refused_and_the_first_completes(tmp_path, st_model):
    texts = {f"lock-{k}": f"row {k} of a job that holds its output " * (1 + k % 9) for k in range(300)}
    src, expected = write_corpus(_corpus_dir(tmp_path / "in"), texts, 2, st_model)
    out = tmp_path / "out"
    args = ["run", "--input", str(src), "--output", str(out), "--unit-rows", "50"]
    first = BackgroundJob([sys.executable, "-m", "hpcembed", *args, "--progress", "log", "--progress-interval", "0.5"],
                          tmp_path / "first.log", {"HF_HUB_OFFLINE": "1"})
    try:
        first.wait_for(r"\d+/300 rows", timeout=180)               # under way: it holds the lock
        # Paused (a live process all the same), so the second job surely comes while the first holds the lock.
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            second = run_cli(*args, "--progress", "off")
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.proc.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.wait(timeout=300) == 0, first.text()[-3000:]
    finally:
        first.stop()
    assert_complete_output(out, expected)
    assert not (out / LOCK).exists()
    # A finished job left no lock: a rerun is told there is nothing to do.
    again = run_cli(*args, "--progress", "off")
    assert again.returncode == 0 and "nothing to do" in again.stderr and not (out / LOCK).exists()


@needs_mpi
def test_a_killed_jobs_lock_is_taken_over_by_the_rerun(tmp_path, st_model):
    texts = {f"k-{k}": f"killed job row {k} " * (1 + k % 7) for k in range(400)}
    src, expected = write_corpus(_corpus_dir(tmp_path / "in"), texts, 2, st_model)
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--unit-rows", "50", "--tokenizer-ranks", "1"]
    job = BackgroundJob.mpi(3, args, tmp_path / "killed.log")
    try:
        job.wait_for(r"[1-9]\d*/400 rows", timeout=180)
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == job.rank_pid(0)
        job.kill_tree()
    finally:
        job.stop()
    assert (out / LOCK).exists()                                     # kill -9: nothing removed it
    rerun = subprocess.run(["timeout", "240", MPIEXEC, "-n", "3", sys.executable, "-m", "hpcembed", "run", *args,
                            "--progress", "off"], capture_output=True, text=True, timeout=270,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "HPCEMBED_MPI": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the lock of pid {holder['pid']}" in rerun.stderr and "is not running" in rerun.stderr
    assert_complete_output(out, expected)
    assert not (out / LOCK).exists()


def test_a_rerun_verifies_the_output_and_redoes_damaged_units(tmp_path, st_model):
    texts = {f"v-{k}": f"verified row {k} " * (1 + k % 5) for k in range(300)}
    src, expected = write_corpus(_corpus_dir(tmp_path / "in"), texts, 1, st_model)
    out = tmp_path / "out"
    args = ("run", "--input", str(src), "--output", str(out), "--unit-rows", "50", "--progress", "off")
    assert run_cli(*args).returncode == 0
    ledger = [json.loads(line) for line in (out / "_ledger.jsonl").read_text().splitlines()[1:]]
    assert all(set(r["files"]) == set(r["shards"]) for r in ledger)          # size and checksum per shard
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 6
    shards[0].unlink()                                                      # missing
    data = bytearray(shards[1].read_bytes())                                # same size, zeroed bytes
    data[200:1200] = bytes(1000)
    shards[1].write_bytes(bytes(data))
    shards[2].write_bytes(shards[2].read_bytes()[:-100])                    # truncated
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shard {shards[0].name} is missing" in rerun.stderr
    assert f"shard {shards[1].name} is not what was written" in rerun.stderr
    assert f"shard {shards[2].name} has" in rerun.stderr and "Traceback" not in rerun.stderr
    manifest = assert_complete_output(out, expected)
    assert manifest["rows_resumed"] == 150 and manifest["rows_written_this_run"] == 150
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_fingerprint_sees_a_same_size_change_of_model_or_input(tmp_path, model_dir):
    import shutil
    # Two copies of the model under the same name, one weight changed in place: the same size, another model.
    copies = [tmp_path / side / "minilm" for side in ("a", "b")]
    for copy in copies:
        shutil.copytree(model_dir, copy)
    weights = copies[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    src = _corpus_dir(tmp_path / "in")
    rows = [{"id": f"f{k}", "text": f"fingerprint row {k}"} for k in range(20)]
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    def run(model):
        return run_cli("run", "--input", str(src), "--output", str(out), "--model", str(model), "--progress", "off")
    assert run(copies[0]).returncode == 0
    other_model = run(copies[1])
    assert other_model.returncode == 2 and "different job" in other_model.stderr
    assert "model_id" in other_model.stderr and "model (" not in other_model.stderr
    # The same input, one row edited to the same length: another job too.
    text = (src / "rows.jsonl").read_text()
    (src / "rows.jsonl").write_text(text.replace("fingerprint row 7", "fingerprint row X"))
    edited = run(copies[0])
    assert edited.returncode == 2 and "inputs (1 files differ" in edited.stderr


def test_generated_ids_of_same_named_files_do_not_collide(tmp_path, st_model):
    src = _corpus_dir(tmp_path / "in")
    texts = {}
    for side in ("a", "b"):
        (src / side).mkdir()
        rows = [f"{side} side row {k}" for k in range(30)]
        (src / side / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        texts.update({f"{side}/x:{k}": t for k, t in enumerate(rows)})
    out = tmp_path / "out"
    proc = run_cli("run", "--input", str(src), "--output", str(out), "--on-invalid", "skip", "--progress", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = sorted(texts)
    ref = dict(zip(ids, st_model.encode([texts[i] for i in ids], normalize_embeddings=True)))
    manifest = assert_complete_output(out, ref)
    assert manifest["rejected_rows"] == 0 and not (out / "_rejects.jsonl").exists()


def test_overwrite_never_removes_a_users_own_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = _corpus_dir(tmp_path / "in")
    (src / "rows.jsonl").write_text("".join(json.dumps({"id": f"o{k}", "text": f"row {k}"}) + "\n" for k in range(10)))
    out = tmp_path / "out"
    args = ("run", "--input", str(src), "--output", str(out), "--progress", "off")
    assert run_cli(*args).returncode == 0
    mine = out / "part-99999999-r00001.parquet"                    # named like a shard, written by the user
    pq.write_table(pa.table({"id": ["mine"], "note": ["keep me"]}), mine)
    refused = run_cli(*args, "--overwrite")
    assert refused.returncode == 2 and mine.name in refused.stderr and "nothing was removed" in refused.stderr
    assert mine.exists() and (out / "_SUCCESS").exists() and len(list(out.glob("part-*.parquet"))) == 2
    mine.unlink()
    array = out / "part-99999999-r00001.npy"                        # an array of the user's, no shard beside it
    array.write_bytes(b"\x93NUMPY")
    refused = run_cli(*args, "--overwrite")
    assert refused.returncode == 2 and array.name in refused.stderr and array.exists()
    array.unlink()
    replaced = run_cli(*args, "--overwrite")
    assert replaced.returncode == 0 and len(list(out.glob("part-*.parquet"))) == 1


def test_a_full_disk_is_a_clear_error_and_the_rerun_resumes(tmp_path, st_model):
    """The file-size limit stands in for a full disk: a shard write fails with EFBIG instead of ENOSPC."""
    import resource
    import signal
    texts = {f"d-{k}": f"disk row {k} " * (2 + k % 5) for k in range(600)}
    src, expected = write_corpus(_corpus_dir(tmp_path / "in"), texts, 1, st_model)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "hpcembed", "run", "--input", str(src), "--output", str(out), "--unit-rows", "300",
            "--progress", "off"]

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                 # write() fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # a 300-row shard is ~460 kB

    full = subprocess.run(args, capture_output=True, text=True, timeout=300, preexec_fn=small_files,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert full.returncode == 2, full.stderr[-3000:]
    assert "cannot write shard part-" in full.stderr and "run the job again" in full.stderr
    assert "Traceback" not in full.stderr and not (out / "_SUCCESS").exists()
    assert not list(out.glob(".part-*"))                                # no temporary file left behind
    again = run_cli(*args[3:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_complete_output(out, expected)


def test_input_fingerprint_by_content_catches_an_edit_that_keeps_size_and_time(tmp_path):
    src = _corpus_dir(tmp_path / "in")
    rows = src / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"c{k}", "text": f"content row {k}"}) + "\n" for k in range(10)))
    out = tmp_path / "out"
    def run(mode):
        return run_cli("run", "--input", str(src), "--output", str(out), "--input-fingerprint", mode,
                       "--progress", "off")
    assert run("content").returncode == 0
    stat = rows.stat()
    rows.write_text(rows.read_text().replace("content row 3", "content row Z"))
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns))         # same size, same modification time
    edited = run("content")
    assert edited.returncode == 2 and "inputs (1 files differ" in edited.stderr


def test_verify_names_what_is_wrong_with_an_output(tmp_path, st_model):
    import shutil
    texts = {f"vf-{k}": f"verify row {k} " * (1 + k % 4) for k in range(200)}
    src, expected = write_corpus(_corpus_dir(tmp_path / "in"), texts, 1, st_model)
    out = tmp_path / "out"
    assert run_cli("run", "--input", str(src), "--output", str(out), "--unit-rows", "50",
                   "--progress", "off").returncode == 0
    good = run_cli("verify", str(out), "--input", str(src))
    assert good.returncode == 0 and "4 shards, 200 rows, dim 384" in good.stderr and "OK" in good.stderr
    # Against the input: a row added since is in neither the output nor the rejects; rows gone are extra.
    with open(src / "part0.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "vf-new", "text": "added after the job"}) + "\n")
    other = _corpus_dir(tmp_path / "other")
    (other / "part0.jsonl").write_text("".join(json.dumps({"id": f"vf-{k}", "text": "x"}) + "\n" for k in range(150)))
    for source, problem in ((src, "1 ids of the input are in neither the output nor _rejects.jsonl, e.g. 'vf-new'"),
                            (other, "50 ids of the output are not in the input, e.g. 'vf-150'")):
        proc = run_cli("verify", str(out), "--input", str(source))
        assert proc.returncode == 3 and problem in proc.stderr, proc.stderr
    shards = sorted(out.glob("part-*.parquet"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-64])
    stray = out / "part-00000099-r00001.parquet"            # a copy the ledger does not name: its ids twice
    shutil.copy(shards[2], stray)
    bad = run_cli("verify", str(out))
    assert bad.returncode == 3 and "Traceback" not in bad.stderr, bad.stderr
    assert f"shard {shards[0].name} is missing" in bad.stderr
    assert f"shard {shards[1].name} has" in bad.stderr
    assert f"shard {stray.name} is not in the ledger" in bad.stderr
    assert f"50 ids are held twice, e.g. in {shards[2].name} and {stray.name}" in bad.stderr
    assert run_cli("verify", str(tmp_path / "in")).returncode == 2             # not an output directory


def test_verify_checks_dimensions_values_and_norms():
    import numpy as np
    import pyarrow as pa
    from hpcembed.verify import _check_embeddings
    emb = np.eye(4, 8, dtype=np.float32)
    emb[1, 0] = np.nan
    emb[2] *= 2.0
    table = pa.table({"id": ["a", "b", "c", "d"],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 8)})
    found = _check_embeddings("part-x.parquet", table, {"dim": 8, "normalize": True})
    assert found == ["shard part-x.parquet row 1: a value that is not finite (1 rows)",
                     "shard part-x.parquet row 2: norm 2.0000, the model normalizes (1 rows)"]
    assert _check_embeddings("part-x.parquet", table, {"dim": 384})[0].endswith("384 dimensions as float32")
    assert len(_check_embeddings("part-x.parquet", table, {"dim": 8, "normalize": False})) == 1


def test_shard_checksums_of_this_release_and_of_earlier_ones_both_verify(tmp_path):
    """Shards are checksummed with tagged xxh3-128; an output written by a release that used BLAKE2b-128 (untagged)
    still verifies, and either kind catches a changed byte."""
    import hashlib

    from hpcembed.io.digest import SHARD_CHECKSUM_TAG, checksum, checksum_matches, file_checksum_matches
    data = os.urandom(3 << 20)          # past one read piece of file_checksum_matches' loop
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    path, bad = tmp_path / "shard", tmp_path / "damaged"
    path.write_bytes(data)
    bad.write_bytes(bytes(damaged))
    earlier = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert checksum(data).startswith(SHARD_CHECKSUM_TAG)
    for recorded in (checksum(data), earlier):
        assert checksum_matches(data, recorded) and file_checksum_matches(path, recorded)
        assert not checksum_matches(bytes(damaged), recorded) and not file_checksum_matches(bad, recorded)
