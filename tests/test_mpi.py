"""The job as a real MPI world: `mpiexec -n N python -m hpcembed run ...` with the pip MPICH wheel."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from .conftest import MPI_ENV, MPIEXEC, REPO, mpirun, needs_mpi, read_manifest, read_output, reference, write_jsonl

pytestmark = needs_mpi


def test_five_ranks_match_sentence_transformers(tmp_path, st_model):
    texts = {f"r{k}": f"document number {k} " + "word " * (k % 37) for k in range(600)}
    data = tmp_path / "in"
    data.mkdir()
    write_jsonl(data / "big.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    for j in range(6):                                     # uneven: one large file, several tiny ones
        write_jsonl(data / f"tiny{j}.jsonl", [{"id": f"t{j}", "text": f"tiny file {j}"}])
        texts[f"t{j}"] = f"tiny file {j}"
    proc = mpirun(5, "--input", str(data), "--output", str(tmp_path / "out"), "--tokenizer-ranks", "2",
                  "--unit-rows", "60", "--chunk-rows", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_output(tmp_path / "out")
    assert set(got) == set(texts)
    ids = sorted(texts)
    ref = reference(st_model, [texts[i] for i in ids])
    assert min(float(got[i] @ r) for i, r in zip(ids, ref)) >= 0.9999
    manifest = read_manifest(tmp_path / "out")
    roles = {r["rank"]: r for r in manifest["ranks"]}
    assert [roles[r]["role"] for r in sorted(roles)] == ["conductor", "encoder", "encoder", "tokenizer", "tokenizer"]
    # Both encoder ranks take rows (credits route batches to each). A tokenizer rank's share is not asserted: units
    # go on demand, and one that started late on a loaded 2-core machine found every unit taken (once, in a suite
    # run); together they read every row.
    assert all(r["rows"] > 0 for r in manifest["ranks"] if r["role"] == "encoder"), manifest["ranks"]
    assert sum(r["rows"] for r in manifest["ranks"] if r["role"] == "tokenizer") == len(texts), manifest["ranks"]
    assert manifest["transport"] == "mpi" and (tmp_path / "out" / "_SUCCESS").exists()
    # Where the time went: each encoder rank's start-up steps in order, its build and its host cost; each
    # tokenizer rank's time outside tokenizing.
    for r in manifest["ranks"]:
        if r["role"] == "encoder":
            steps = r["startup"]
            assert steps["process_started"] <= steps["plan_received"] <= steps["ready"] <= steps["first_batch_taken"] \
                <= steps["first_batch"]
            assert steps["process_started"] <= steps["mpi_ready"] <= steps["ranks_gathered"] <= steps["building"]
            assert steps["building"] <= steps["built"] <= steps["ready"]
            assert r["batches"] > 0 and r["host_cpu_seconds"] > 0 and r["host_us_per_row"] > 0
            assert r["build_seconds"]["weights"] > 0
            # Wall-clock stamps (time.time(), to compare ranks): in one CI run the VM's clock stepped back 3 ms
            # between two of them, so their order is checked to within 50 ms.
            assert r["ready_at"] <= r["last_encoded_at"] + 0.05 and r["last_encoded_at"] <= r["last_written_at"] + 0.05
            assert r["writer_seconds"] > 0
            assert (r["engine"], r["attention"], r["fused_ops"]) == ("varlen", "padded", "eager")    # CPU: no kernels
        elif r["role"] == "tokenizer":
            assert r["started_at"] <= r["finished_at"]
            if r["rows"]:
                assert r["started_at"] - 0.05 <= r["first_sent_at"] <= r["finished_at"] + 0.05
                assert r["granted_at"] - 0.05 <= r["first_sent_at"]
                assert r["first_formed_at"] <= r["first_sent_at"] + 0.05
            other = r["other_seconds"]
            assert set(other) == {"unit_wait", "credit_wait", "send", "read", "claim_wait", "finish", "untracked"}
            assert min(other.values()) >= -0.005, other       # untracked is what is left: never much below zero
    job_steps = manifest["startup_seconds"]
    assert 0 < job_steps["plan_received"] <= job_steps["ready"] <= job_steps["first_batch"]
    assert 0 < job_steps["mpi_ready"] <= job_steps["ranks_gathered"] <= job_steps["building"] <= job_steps["ready"]
    # The conductor's own steps, on the encoder ranks' clock: it sends the plan before any rank receives it.
    conductor = manifest["conductor_startup_seconds"]
    assert conductor["mpi_ready"] <= conductor["ranks_gathered"] <= conductor["prepared"] <= conductor["roles_planned"]
    assert conductor["roles_planned"] <= conductor["plan_sent"] <= job_steps["plan_received"] + 0.05


def test_only_encoder_ranks_import_torch(tmp_path):
    """Tokenizer ranks and the conductor never import torch: importing it (and initialising CUDA) costs seconds of
    start-up when a node's ranks all do it at once, and memory in every rank. Each rank writes at exit whether
    torch was imported; under this MPICH the encoder rank too, as it leaves through Python's teardown (the os._exit
    of launch/mpi.py's _leave_without_teardown is for Open MPI only)."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": f"text {k}"} for k in range(200)])
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import atexit, os, runpy, sys\n"
        "rank = os.environ['PMI_RANK']\n"
        f"where = {str(tmp_path)!r}\n"
        "def record():\n"
        "    with open(os.path.join(where, 'torch-' + rank), 'w') as fh:\n"
        "        fh.write(str('torch' in sys.modules))\n"
        "atexit.register(record)\n"
        "runpy.run_module('hpcembed', run_name='__main__')\n")
    cmd = ["timeout", "240", MPIEXEC, "-n", "4", sys.executable, str(probe), "run", "--input",
           str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--tokenizer-ranks", "2", "--progress", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=270, env={**os.environ, **MPI_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "_SUCCESS").exists() and len(read_output(tmp_path / "out")) == 200
    roles = {r["rank"]: r["role"] for r in read_manifest(tmp_path / "out")["ranks"]}
    imported = {r: (tmp_path / f"torch-{r}").read_text() for r in range(4)}
    assert imported == {r: str(role == "encoder") for r, role in roles.items()}, imported


def test_failing_rank_ends_the_job(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{k}", "text": "fine"} for k in range(100)] +
                [{"id": "bad", "text": None}])
    start = time.monotonic()
    proc = mpirun(4, "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), "--unit-rows", "20",
                  timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "row 100 (id 'bad'): text 'text' is null" in proc.stderr and "rank " in proc.stderr, (proc.returncode, proc.stderr[-2000:])
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_world_too_small_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    proc = mpirun(2, "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"), timeout=120)
    assert proc.returncode != 0 and "needs at least 3 ranks" in proc.stderr, proc.stderr[-2000:]


def test_ids_repeated_across_tokenizer_ranks(tmp_path, st_model):
    # Every file repeats the id "dup"; with 3 tokenizer ranks the repeats are spread over ranks, so only the
    # all-to-all check after reading can see them. The first file's row must be the one kept.
    data = tmp_path / "in"
    data.mkdir()
    for j in range(8):
        write_jsonl(data / f"f{j}.jsonl", [{"id": f"f{j}-{k}", "text": f"row {k} of file {j}"} for k in range(20)]
                    + [{"id": "dup", "text": f"copy from file {j}"}])
    args = ["--input", str(data), "--tokenizer-ranks", "3", "--unit-rows", "60", "--chunk-rows", "8"]
    proc = mpirun(5, *args, "--output", str(tmp_path / "skip"), "--on-invalid", "skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_output(tmp_path / "skip")
    assert len(got) == 8 * 20 + 1
    assert float(got["dup"] @ reference(st_model, ["copy from file 0"])[0]) >= 0.9999
    rejects = [json.loads(line) for line in (tmp_path / "skip" / "_rejects.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rejects) == sorted(str(data / f"f{j}.jsonl") for j in range(1, 8))
    assert all("duplicate id" in r["reason"] and r["row"] == 20 for r in rejects), rejects
    manifest = read_manifest(tmp_path / "skip")
    assert manifest["complete"] and manifest["rows_written"] == 161 and manifest["rejected_rows"] == 7
    assert sum(s["rows"] for s in manifest["shards"]) == 161
    # Without --on-invalid skip the conductor fails the job on the first report: test_protocol.py checks that rule
    # in-process, and test_failing_rank_ends_the_job the MPI launcher's exit on a conductor-side error.


def test_rate_plan_keeps_the_tokenizers_the_encoders_need():
    from hpcembed.topology import RankInfo, RoleMap, plan_tokenizers
    # Two hosts of 8 cores, one H100 each; rank 0 (conductor) on the first.
    ranks = [RankInfo(r, f"n{r // 8}", r % 8, 1, 1, None, 8, "NVIDIA H100 80GB HBM3") for r in range(16)]
    roles = RoleMap(0, [r for r in range(16) if r not in (1, 8)], [1, 8], {r.rank: r.host for r in ranks})
    # 2 x 12.34M tokens/s at 3M per tokenizer: 9.5 with headroom, so 10, spread over both hosts.
    planned, plan = plan_tokenizers(roles, ranks, 3e6)
    assert plan.needed == 10 and plan.chosen == 10 and plan.expected_gpu_busy == 1.0
    assert planned.encoders == [1, 8]
    on = [sum(1 for t in planned.tokenizers if ranks[t].host == h) for h in ("n0", "n1")]
    assert on == [5, 5]
    assert {planned.role_of(r) for r in range(16)} == {"conductor", "tokenizer", "encoder", "idle"}
    # Slow tokenizers: every core is used (8 - 2 for the encoder rank - 1 for the conductor = 5 on n0, 6 on n1),
    # and the plan says the node is CPU-bound.
    planned, plan = plan_tokenizers(roles, ranks, 0.5e6)
    assert plan.chosen == 11 == len(planned.tokenizers) and plan.expected_gpu_busy < 0.9
    assert "CPU-bound" in plan.describe()
    # A stated encoder rate replaces the table's.
    _, plan = plan_tokenizers(roles, ranks, 1e6, gpu_tokens_per_s=1e6)
    assert plan.needed == 3 and plan.gpu_rate_source == "--gpu-tokens-per-s"
    # A host without a spare core (2 cores: the encoder rank's) still gets one tokenizer rank, and says so.
    small = [RankInfo(r, "n0", r, 1, 1, None, 2, "NVIDIA H100 80GB HBM3") for r in range(4)]
    planned, plan = plan_tokenizers(RoleMap(0, [2, 3], [1], {r: "n0" for r in range(4)}), small, 3e6)
    assert planned.tokenizers == [2] and "no core is spare for them, so 1 shares one" in plan.describe()


def test_early_rate_probe_measures_the_first_input_or_leaves_it_to_the_plan(tmp_path):
    from hpcembed.config import JobConfig
    from hpcembed.launch.kinds import KINDS
    from hpcembed.launch.planning import EarlyRateProbe
    EMBED = KINDS["run"]
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": f"early probe row {k} " * 4} for k in range(200)])
    rate, backend = EarlyRateProbe(JobConfig(input=[str(tmp_path / "in.jsonl")], gpu_tokens_per_s=1e7),
                                   EMBED).result()
    assert rate > 1000 and backend in ("hf", "budtiktok")
    # A missing input: no answer here (the plan reports the mistake); without a rate to plan for, no probe.
    assert EarlyRateProbe(JobConfig(input=[str(tmp_path / "nothing.jsonl")], gpu_tokens_per_s=1e7),
                          EMBED).result() is None
    assert EarlyRateProbe(JobConfig(input=[str(tmp_path / "in.jsonl")], device="cpu"), EMBED)._thread is None


def test_planned_job_leaves_spare_ranks_idle(tmp_path, st_model):
    texts = {f"r{k}": f"planned job row {k} " * (1 + k % 5) for k in range(300)}
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    # A stated encoder rate of 1 token/s needs a single tokenizer: of 6 ranks (2 encoder, 3 tokenizer candidates),
    # 2 stay idle and must still leave the job cleanly.
    proc = mpirun(6, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--unit-rows", "50",
                  "--gpu-tokens-per-s", "1")
    assert proc.returncode == 0, proc.stderr
    assert "2 idle" in proc.stderr and "plan: 2 encoder rank(s)" in proc.stderr
    # The plan counts on a busy node's rate, and says what the probe alone measured.
    found = re.search(r"does ([\d.]+)M tokens/s on a busy node \(([\d.]+)M measured alone on rank 0\)", proc.stderr)
    assert found and abs(float(found.group(2)) / float(found.group(1)) - 1.4) < 0.05, proc.stderr
    manifest = read_manifest(tmp_path / "out")
    assert [r["role"] for r in manifest["ranks"]].count("tokenizer") == 1
    got = read_output(tmp_path / "out")
    ids = sorted(texts)
    ref = reference(st_model, [texts[i] for i in ids])
    assert min(float(got[i] @ r) for i, r in zip(ids, ref)) > 0.9999


def test_a_job_of_fewer_units_than_tokenizer_ranks_is_told_the_unit_rows_that_fit(tmp_path):
    """One unit for two tokenizer ranks: the job runs, and says which --unit-rows gives each rank a unit; with that
    size it says nothing."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": f"unit advice row {k}"} for k in range(64)])
    common = ("--input", str(tmp_path / "in.jsonl"), "--steal-rows", "16", "--device", "cpu")
    advised = mpirun(4, *common, "--output", str(tmp_path / "a"))
    assert advised.returncode == 0, advised.stderr
    assert "1 work unit(s) for 2 tokenizer ranks" in advised.stderr and "--unit-rows 32 (now 50000)" in advised.stderr
    fitted = mpirun(4, *common, "--output", str(tmp_path / "b"), "--unit-rows", "32")
    assert fitted.returncode == 0, fitted.stderr
    assert "work unit(s) for" not in fitted.stderr and read_manifest(tmp_path / "b")["rows_written"] == 64


def test_links_are_sparse_local_first_and_cover_every_encoder():
    from hpcembed.topology import RoleMap
    # 1000 nodes x (8 encoder ranks + 8 tokenizer ranks), and a het layout with tokenizers on CPU-only nodes.
    hosts = {r: f"n{r // 16}" for r in range(16000)}
    gpus = [r for r in range(16000) if r % 16 < 8]
    tokenizers = [r for r in range(16000) if r % 16 >= 8 and r != 15999]
    roles = RoleMap(15999, tokenizers, gpus, hosts)
    assert all(sorted(roles.encoders_of(t)) == [g for g in gpus if hosts[g] == hosts[t]] for t in tokenizers[:50])
    # A host's tokenizers list its encoder ranks each from a different one, so routing ties spread them.
    assert sorted(roles.encoders_of(t)[0] for t in tokenizers[:8]) == gpus[:8]
    assert all(len(roles.tokenizers_of(g)) >= 7 for g in gpus)
    het = RoleMap(0, list(range(1, 41)), list(range(100, 420)), {**{r: "cpu" for r in range(41)},
                                                                 **{g: f"g{g // 8}" for g in range(100, 420)}})
    assert max(len(het.encoders_of(t)) for t in het.tokenizers) == 8        # 320 gpus / 40 tokenizers: fanout 8
    assert all(len(het.tokenizers_of(g)) == 1 for g in het.encoders)
    # Tokenizers on CPU nodes that each link to all 8 encoder ranks of one GPU node start from different ones too.
    het8 = RoleMap(0, list(range(1, 41)), list(range(100, 108)), {**{r: "cpu" for r in range(41)},
                                                                  **{g: "g0" for g in range(100, 108)}})
    assert sorted({het8.encoders_of(t)[0] for t in het8.tokenizers}) == het8.encoders
    few = RoleMap(0, [1, 2], list(range(3, 40)), {r: "h" for r in range(40)})
    assert all(few.tokenizers_of(g) for g in few.encoders)                  # the fanout grows past 8 to cover all
