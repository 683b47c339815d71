"""The slurm/ job scripts, submitted unchanged with `sbatch` to a real slurmctld and 3 slurmd (tests/slurm_cluster.py:
8 CPUs and 2 fake GPUs per node), checked against sentence-transformers row by row."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from hpcembed.manifest import ranks_by_role

from .conftest import REPO, assert_complete_output, read_manifest, reference, write_corpus, write_jsonl
from .slurm_cluster import SlurmCluster, slurm_available

pytestmark = pytest.mark.skipif(not slurm_available(), reason="needs root and Slurm's daemons (apt-get install "
                                "slurmctld slurmd slurm-client; .ci/run does)")
SCRIPTS = REPO / "slurm"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    # Jobs find this venv's hpcembed through PATH, which sbatch exports to them.
    c.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + c.env["PATH"]
    c.env["HF_HUB_OFFLINE"] = "1"
    yield c
    c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, st_model):
    texts = {f"d{k:04d}": f"slurm document {k} " + "text " * (k % 29) for k in range(600)}
    return write_corpus(tmp_path_factory.mktemp("slurm-corpus"), texts, 3, st_model)


def job_file(tmp_path: Path, corpus_dir: Path, out: Path, **extra) -> Path:
    settings = {"input": [str(corpus_dir)], "output": str(out), "unit_rows": 25, "chunk_rows": 10, **extra}
    lines = [f"{k.replace('_', '-')} = {json.dumps(v)}" for k, v in settings.items()]
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def submit_wait(cluster: SlurmCluster, tmp_path: Path, script: str, *args: str, timeout: float = 300) -> str:
    proc = cluster.run("sbatch", "--wait", "--parsable", str(SCRIPTS / script), *args, cwd=tmp_path,
                       timeout=timeout, check=False)
    job = proc.stdout.strip().split(";")[0]
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job}.*")))
    assert proc.returncode == 0, (f"sbatch {script} exited {proc.returncode}: {proc.stderr}\n{logs[-4000:]}\n"
                                  f"{cluster.diagnose()}")
    return logs


def test_single_node(cluster, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    logs = submit_wait(cluster, tmp_path, "embed-single-node.sbatch", str(job_file(tmp_path, root, out)))
    manifest = assert_complete_output(out, expected)
    by_role = ranks_by_role(manifest)
    # 8 tasks, 1 GPU allocated by default: 1 conductor, 1 gpu rank, 6 tokenizer ranks, all on one node.
    assert len(by_role["encoder"]) == 1 and len(by_role["tokenizer"]) == 6
    assert {r["host"] for r in manifest["ranks"]} == {by_role["conductor"][0]["host"]}
    assert "progress:" in logs and "complete: 600 rows embedded" in logs


def test_multi_node(cluster, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    submit_wait(cluster, tmp_path, "embed-multi-node.sbatch", str(job_file(tmp_path, root, out)))
    manifest = assert_complete_output(out, expected)
    by_role = ranks_by_role(manifest)
    # 2 nodes x 4 tasks, 1 GPU each: a gpu rank on each node. Work goes on demand, so on this 2-core box one
    # encoder rank may finish the small corpus before the other has loaded its model, or each may keep up with its
    # own node's tokenizers so that no batch needs to leave the node (routing prefers the encoder rank whose credit is
    # back). What must hold is that the encoder ranks together embedded every row and that every tokenizer rank is
    # linked to the other node's encoder rank too. That batches do cross nodes under Slurm, test_het_job shows.
    assert len({r["host"] for r in by_role["encoder"]}) == 2 and len(by_role["tokenizer"]) == 5
    assert sum(r["rows"] for r in by_role["encoder"]) == len(expected)
    host = {r["rank"]: r["host"] for r in manifest["ranks"]}
    for t in by_role["tokenizer"]:
        assert {host[int(g)] for g in t["batches_sent"]} == {r["host"] for r in by_role["encoder"]}, t


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_het_job(cluster, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    submit_wait(cluster, tmp_path, "embed-hetjob.sbatch", str(job_file(tmp_path, root, out)))
    manifest = assert_complete_output(out, expected)
    by_role = ranks_by_role(manifest)
    tokenizer_hosts = {r["host"] for r in by_role["tokenizer"]}
    gpu_hosts = {r["host"] for r in by_role["encoder"]}
    assert len(by_role["tokenizer"]) == 2 and all(r["rows"] > 0 for r in by_role["tokenizer"])
    assert len(by_role["encoder"]) == 2 and all(r["rows"] > 0 for r in by_role["encoder"])
    assert not tokenizer_hosts & gpu_hosts           # component 0 and component 1 on their own nodes
    # So every token batch crossed between nodes, and the encoder ranks' rows all came that way.
    assert sum(n for t in by_role["tokenizer"] for n in t["batches_sent"].values()) > 0


def test_usr1_requeues_and_resumes(cluster, tmp_path, st_model):
    texts = {f"s{k:05d}": f"requeue test row {k} " + "word " * (k % 23) for k in range(1600)}
    root = tmp_path / "in"
    root.mkdir()
    write_jsonl(root / "big.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    out = tmp_path / "out"
    # A small batch window, so the tokenizers are still reading when the signal comes.
    job = job_file(tmp_path, root, out, max_batch_tokens=256, window_batches=2, unit_rows=50)
    submitted = cluster.run("sbatch", "--parsable", str(SCRIPTS / "embed-single-node.sbatch"), str(job),
                            cwd=tmp_path)
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 240
    ledger = out / "_ledger.jsonl"
    while not (ledger.exists() and '"kind": "unit"' in ledger.read_text()):
        logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job_id}.*")))
        assert time.monotonic() < deadline and "error" not in logs, f"no unit committed:\n{logs[-3000:]}"
        time.sleep(0.1)
    # What --signal=B:USR1@120 does near the time limit: signal the batch shell.
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    state = ""
    while time.monotonic() < deadline:
        info = cluster.run("scontrol", "show", "job", job_id, check=False).stdout
        state = next((w.split("=")[1] for w in info.split() if w.startswith("JobState=")), "")
        restarts = next((int(w.split("=")[1]) for w in info.split() if w.startswith("Restarts=")), 0)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(0.5)
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job_id}.*")))
    assert state == "COMPLETED" and restarts >= 1, (state, logs[-4000:], cluster.diagnose())
    assert "SIGUSR1 received" in logs and "requeueing job" in logs
    ids = sorted(texts)
    expected = dict(zip(ids, reference(st_model, [texts[i] for i in ids])))
    manifest = assert_complete_output(out, expected)
    assert manifest["rows_resumed"] > 0 and manifest["units_resumed"] > 0


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_tokenize_then_embed(cluster, corpus, tmp_path):
    root, expected = corpus
    out, tokdir = tmp_path / "out", tmp_path / "tokens"
    # --wait on the embedding job makes the script return when both jobs are done.
    proc = cluster.run("bash", str(SCRIPTS / "tokenize-then-embed.sh"), str(job_file(tmp_path, root, out)),
                       str(tokdir), env={"HPCEMBED_EMBED_SBATCH": "--wait"}, cwd=tmp_path, timeout=400, check=False)
    logs = "".join(p.read_text(errors="replace") for p in sorted([*tmp_path.glob("*.out"), *tmp_path.glob("*.err")]))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs[-4000:] + cluster.diagnose()
    assert "tokenize job:" in proc.stdout and "embed job:" in proc.stdout
    tokens = read_manifest(tokdir)
    assert tokens["kind"] == "tokens" and tokens["complete"] and tokens["rows_written"] == len(expected)
    # The CPU job ran no encoder rank: the conductor and 7 tokenizer ranks writing token shards.
    assert {r["role"] for r in tokens["ranks"]} == {"conductor", "tokenizer"} and len(tokens["ranks"]) == 8
    manifest = assert_complete_output(out, expected)
    assert {i["format"] for i in manifest["inputs"]} == {"tokens"}
    assert "complete: 600 rows tokenized" in logs and "complete: 600 rows embedded" in logs


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_scaling_sweep_collects_manifests(cluster, corpus, tmp_path):
    root, expected = corpus
    sweep = tmp_path / "sweep"
    proc = cluster.run("bash", str(SCRIPTS / "scaling-sweep.sh"), str(job_file(tmp_path, root, tmp_path / "unused")),
                       str(sweep), env={"HPCEMBED_SWEEP_NODES": "1 2"}, cwd=tmp_path, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + cluster.diagnose()
    for nodes in (1, 2):
        manifest = json.loads((sweep / "manifests" / f"nodes-{nodes}.json").read_text())
        assert manifest["sweep"]["nodes"] == nodes and manifest["complete"]
        assert len({r["host"] for r in manifest["ranks"]}) == nodes
        assert_complete_output(sweep / f"nodes-{nodes}" / "output", expected)
    # The scaling harness reads the sweep's manifests as measured rows.
    study = tmp_path / "study"
    proc = cluster.run(sys.executable, "-m", "hpcembed", "scaling", "measure", "--study", str(study), "--series",
                       "slurm", "--from-manifests", str(sweep / "manifests"), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((study / "measured.json").read_text())["rows"]
    assert [(r["nodes"], r["source"]) for r in rows] == [(1, "measured"), (2, "measured")]
    assert rows[0]["efficiency"] == 1.0 and all(r["throughput_texts_per_s"] > 0 for r in rows)



@pytest.mark.parametrize("tasks", [1, 3])
def test_serve_sbatch_answers_then_drains_on_scancel(cluster, tmp_path, st_model, tasks):
    """slurm/serve.sbatch: the server comes up on the node, in one process or with roles (a frontend, an encoder
    rank and a tokenizer rank), answers a query as sentence-transformers does, and `scancel` (SIGTERM) drains it:
    it logs that it stopped rather than being killed."""
    import re
    import urllib.request
    shape = ["--ntasks", str(tasks), "--cpus-per-task", "1"] if tasks > 1 else []
    submitted = cluster.run("sbatch", "--parsable", *shape, str(SCRIPTS / "serve.sbatch"), "--port", "0",
                            cwd=tmp_path)
    job_id = submitted.stdout.strip()
    deadline = time.monotonic() + 180

    def logs() -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob(f"*-{job_id}.*")))
    try:
        while not (found := re.search(r"http://0\.0\.0\.0:(\d+)", logs())):
            assert time.monotonic() < deadline and "error" not in logs(), f"no server:\n{logs()[-3000:]}"
            time.sleep(0.2)
        body = json.dumps({"model": "all-MiniLM-L6-v2", "input": ["a query from the cluster"]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{found.group(1)}/v1/embeddings", data=body)
        with urllib.request.urlopen(request, timeout=60) as resp:
            got = json.loads(resp.read())["data"][0]["embedding"]
        assert float(sum(a * b for a, b in zip(got, reference(st_model, ["a query from the cluster"])[0]))) > 0.9999
    finally:
        cluster.run("scancel", job_id, check=False)
    while "stopped" not in logs():
        assert time.monotonic() < deadline, f"the server did not drain:\n{logs()[-3000:]}"
        time.sleep(0.2)
    assert "draining" in logs()
    if tasks > 1:
        assert "role map: 1 frontend, 1 tokenizer, 1 encoder ranks" in logs()
    # Drained, the job ends, every task with it: none is left running when the cluster stops (a rank still in
    # MPI's finalize once slurmd was gone was left behind before this wait).
    deadline = time.monotonic() + 90
    while cluster.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"the job did not end after draining:\n{cluster.diagnose()}"
        time.sleep(0.2)
