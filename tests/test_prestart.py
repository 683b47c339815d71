"""Work before MPI_Init (launch/prestart.py): the guess of which ranks will be encoder ranks, made from the
launcher's environment before MPI is up, against the roles plan_roles gives once it is; and a real mpiexec world in
which the guessed encoder rank imports torch, and rank 0 probes its tokenizer, before MPI_Init."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpcembed.launch.prestart import gpus_without_cuda, launcher_ranks, likely_encoder_rank
from hpcembed.topology import RankInfo, plan_roles

from .conftest import MPI_ENV, MPIEXEC, REPO, needs_mpi, read_manifest, write_jsonl


@pytest.mark.parametrize("hosts,per_host,gpus", [(1, 16, 1), (1, 16, 8), (3, 10, 4), (2, 5, 2), (4, 9, 8)])
def test_guess_matches_plan_roles_for_ranks_laid_out_by_host(hosts, per_host, gpus):
    ranks = [RankInfo(r, f"h{r // per_host}", r % per_host, gpus) for r in range(hosts * per_host)]
    planned = plan_roles(ranks, None).encoders
    guessed = [r.rank for r in ranks if likely_encoder_rank(r.rank, r.local_rank, gpus)]
    assert guessed == planned and len(planned) == hosts * gpus


def test_no_gpus_no_guess():
    assert not any(likely_encoder_rank(r, r, 0) for r in range(8))


def test_launcher_ranks_from_each_launcher():
    assert launcher_ranks({"OMPI_COMM_WORLD_RANK": "17", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == (17, 1)
    assert launcher_ranks({"PMI_RANK": "3", "MPI_LOCALRANKID": "3"}) == (3, 3)          # MPICH's Hydra
    assert launcher_ranks({"SLURM_PROCID": "9", "SLURM_LOCALID": "0"}) == (9, 0)
    assert launcher_ranks({"PMI_RANK": "3"}) is None                                    # no local rank: no guess
    assert launcher_ranks({}) is None


def test_gpus_counted_without_cuda(tmp_path):
    driver = tmp_path / "gpus"
    driver.mkdir()
    for bus in ("0000:18:00.0", "0000:2a:00.0"):
        (driver / bus).mkdir()
    assert gpus_without_cuda({}, driver) == 2
    assert gpus_without_cuda({"CUDA_VISIBLE_DEVICES": "3"}, driver) == 1
    assert gpus_without_cuda({"CUDA_VISIBLE_DEVICES": "GPU-5e1c,GPU-77ab,GPU-0f00"}, driver) == 3
    assert gpus_without_cuda({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, driver) == 1      # CUDA stops at -1
    assert gpus_without_cuda({"CUDA_VISIBLE_DEVICES": ""}, driver) == 0
    assert gpus_without_cuda({}, tmp_path / "no-driver") == 0


@needs_mpi
def test_encoder_rank_imports_torch_before_mpi(tmp_path):
    """CUDA_VISIBLE_DEVICES=0 on this GPU-less box makes the ranks count one GPU before MPI: rank 1 imports torch
    and rank 0 runs its tokenizer probe (--gpu-tokens-per-s asks for the rate plan) before MPI_Init. The census
    then finds no CUDA device, so the job runs its encoder on CPU and completes. No other rank imports torch."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": f"text number {k}"} for k in range(300)])
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
           str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--gpu-tokens-per-s", "1e6",
           "--progress", "off"]
    env = {**os.environ, **MPI_ENV, "CUDA_VISIBLE_DEVICES": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=270, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "out")
    by_rank = {r["rank"]: r for r in manifest["ranks"]}
    assert by_rank[1]["role"] == "encoder"
    encoder, conductor = by_rank[1]["startup"], by_rank[0]["startup"]
    assert encoder["process_started"] <= encoder["torch_imported"] <= encoder["mpi_ready"]
    assert conductor["probe_done"] <= conductor["mpi_ready"] <= conductor["prepared"] <= conductor["roles_planned"]
    assert conductor["roles_planned"] <= conductor["plan_sent"] <= encoder["first_batch"] + 0.05
    assert 0 < manifest["startup_seconds"]["torch_imported"] <= manifest["startup_seconds"]["mpi_ready"]
    assert set(manifest["conductor_startup_seconds"]) >= {"probe_done", "mpi_ready", "prepared", "plan_sent"}
    imported = {r: (tmp_path / f"torch-{r}").read_text() == "True" for r in range(4)}
    assert imported == {r: by_rank.get(r, {}).get("role") == "encoder" for r in range(4)}, imported
