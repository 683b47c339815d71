"""The UCX transport (hpcembed/transport/ucx.py) in real MPI jobs: on one host, across three "hosts" made of
network namespaces (tests/netns.py) with UCX forced onto TCP so batches cross the virtual network, and with a
tokenizer rank killed while batches are moving."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import (MPI_ENV, MPIEXEC, REPO, assert_complete_output, mpirun, needs_mpi, process_tree, read_output,
                       write_corpus, write_jsonl)
from .netns import VirtualHosts, netns_available

pytestmark = [needs_mpi, pytest.mark.skipif(not __import__("hpcembed.transport.ucx", fromlist=["x"]).ucx_available(),
                                            reason="ucxx not installed (pip install -e '.[test]' installs it)")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, st_model):
    texts = {f"u{k:04d}": f"ucx row {k} " + "payload " * (k % 41) for k in range(500)}
    texts["empty"], texts["emoji"], texts["cjk"] = "", "🚀🔥 ok", "東京で会いましょう"
    return write_corpus(tmp_path_factory.mktemp("ucx-corpus"), texts, 1, st_model)


def _crossed(manifest: dict) -> int:
    host = {r["rank"]: r["host"] for r in manifest["ranks"]}
    return sum(n for r in manifest["ranks"] if r["role"] == "tokenizer"
               for g, n in r["batches_sent"].items() if host[int(g)] != r["host"])


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_ucx_gives_the_same_output_as_mpi(tmp_path, corpus):
    root, expected = corpus
    outputs = {}
    for transport in ("mpi", "ucx"):
        out = tmp_path / transport
        proc = mpirun(5, "--input", str(root), "--output", str(out), "--transport", transport,
                      "--tokenizer-ranks", "2", "--unit-rows", "60", "--chunk-rows", "16")
        assert proc.returncode == 0, proc.stderr[-3000:]
        manifest = assert_complete_output(out, expected)
        assert manifest["transport"] == transport
        outputs[transport] = read_output(out)
    # Batches are composed differently on each run, so the float sums can differ in the last bits only.
    assert max(float(np.abs(outputs["mpi"][i] - outputs["ucx"][i]).max()) for i in expected) < 1e-5


@pytest.mark.parametrize("env, one_host", [
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4"}, True),
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, False),
    ({"SLURM_STEP_NUM_NODES": "1"}, True),
    ({"SLURM_STEP_NUM_NODES": "2"}, False),
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4", "HPCEMBED_VIRTUAL_NODES": "2"}, False),
    ({"PMI_SIZE": "4", "MPI_LOCALNRANKS": "4", "HPCEMBED_VIRTUAL_NODES": "two"}, False),
    ({}, False),
])
def test_one_host_is_read_from_the_launcher(monkeypatch, env, one_host):
    from hpcembed.world import launched_on_one_host
    for name in ("PMI_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                 "SLURM_STEP_NUM_NODES", "HPCEMBED_VIRTUAL_NODES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_on_one_host() is one_host


def test_auto_uses_mpi_on_one_host(tmp_path, corpus):
    root, expected = corpus
    proc = mpirun(4, "--input", str(root), "--output", str(tmp_path / "out"), "--unit-rows", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert assert_complete_output(tmp_path / "out", expected)["transport"] == "mpi"


# --- three hosts in network namespaces ----------------------------------------------------------------------

NETNS_OK, NETNS_WHY = netns_available()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if not NETNS_OK:
        pytest.skip(NETNS_WHY)
    v = VirtualHosts(3, tmp_path_factory.mktemp("netns")).start()
    yield v
    v.stop()


def _mpirun_hosts(hosts: VirtualHosts, per_host: list[int], *args: str, timeout: float = 240):
    cmd = ["timeout", str(int(timeout)), MPIEXEC, *hosts.mpiexec_args(per_host), sys.executable, "-m", "hpcembed",
           "run", *args, "--progress", "off"]
    # tcp,self: no shared memory between the "hosts", so every batch crosses the veth links and the bridge.
    env = {**os.environ, **MPI_ENV, "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout + 30, env=env)


@pytest.mark.parametrize("transport", [pytest.param("mpi", marks=pytest.mark.slow), "ucx"])
def test_three_hosts(hosts, tmp_path, corpus, transport):
    root, expected = corpus
    out = tmp_path / "out"
    proc = _mpirun_hosts(hosts, [2, 2, 2], "--input", str(root), "--output", str(out), "--transport", transport,
                         "--tokenizer-ranks", "3", "--unit-rows", "60", "--chunk-rows", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = assert_complete_output(out, expected)
    assert manifest["transport"] == transport
    assert {r["host"] for r in manifest["ranks"]} == set(hosts.hostnames)
    assert _crossed(manifest) > 0


def test_auto_uses_ucx_across_hosts(hosts, tmp_path, corpus):
    root, expected = corpus
    out = tmp_path / "out"
    proc = _mpirun_hosts(hosts, [1, 1, 2], "--input", str(root), "--output", str(out), "--unit-rows", "100",
                         "--tokenizer-ranks", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert assert_complete_output(out, expected)["transport"] == "ucx"


# --- a peer dies ----------------------------------------------------------------------------------------------

def kill_a_tokenizer_mid_run(cmd: list[str], env: dict, after: float = 6.0) -> tuple[int, str, float, int]:
    """Start `cmd` (a job printing its role map), SIGKILL its first tokenizer rank `after` seconds after the role
    map is out, while batches are moving; return (exit code, output, seconds from the kill to the end, rank)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    lines, victim, killed_at = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"rank (\d+) on \S+ \(pid (\d+)\): tokenizer", line)
            if found and victim is None:
                victim = (int(found.group(1)), int(found.group(2)))
            if victim and killed_at is None and "role map" in line:
                time.sleep(after)
                os.kill(victim[1], signal.SIGKILL)
                killed_at = time.monotonic()
        proc.wait(timeout=60)
    finally:
        for pid in reversed(process_tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert killed_at is not None, "".join(lines)[-3000:]
    return proc.returncode, "".join(lines), time.monotonic() - killed_at, victim[0]


def slow_corpus(path) -> None:
    """Enough rows that the tokenizers are still sending when the kill comes (the CPU encoder is slow)."""
    write_jsonl(path, [{"id": f"k{k}", "text": f"row {k} " + "long " * (k % 200)} for k in range(6000)])


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_killed_tokenizer_under_mpiexec_ends_the_job(tmp_path):
    # mpiexec's default: a rank that dies takes the job down with it. It must end promptly, and not look done.
    slow_corpus(tmp_path / "big.jsonl")
    cmd = ["timeout", "150", MPIEXEC, "-n", "5", sys.executable, "-m", "hpcembed", "run", "--input",
           str(tmp_path / "big.jsonl"), "--output", str(tmp_path / "out"), "--transport", "ucx",
           "--tokenizer-ranks", "3", "--unit-rows", "200", "--chunk-rows", "8", "--progress", "off"]
    code, output, took, _ = kill_a_tokenizer_mid_run(cmd, {**os.environ, **MPI_ENV})
    assert code not in (0, 124) and took < 30, (code, output[-3000:])
    assert not (tmp_path / "out" / "_SUCCESS").exists()
