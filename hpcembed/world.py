"""Who am I: the MPI world (or one process), the hosts and GPUs in it, and which rank plays which role.

Roles: rank 0 is the conductor. On hosts with GPUs, the first ranks of each host (rank 0 aside) become gpu
ranks, one per GPU, in host-local order. The rest are tokenizer ranks. Without GPUs (CPU-only clusters) gpu
ranks run the encoder on CPU: by default half of the non-conductor ranks, or whatever --tokenizer-ranks leaves.
In a Slurm het step, component 0 (CPU nodes) holds the conductor and the tokenizer ranks and every other
component's ranks are gpu ranks.

Under Slurm, hosts are Slurm node names and their GPUs are the ones Slurm allocated (slurm.py); the device a gpu
rank uses is CUDA if torch sees any, else CPU (so CI's fake gres GPUs run the encoder on CPU).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .errors import ConfigError
from .roles.common import RoleMap


@dataclass
class RankInfo:
    rank: int
    host: str
    local_rank: int
    gpus_on_host: int               # GPUs this host offers the job (Slurm's allocation, else what torch sees)
    cuda_devices: int = 0           # CUDA devices torch can use on this host
    het_group: int | None = None


def under_mpi() -> bool:
    """True when launched by mpiexec/srun with more than one rank (or forced with HPCEMBED_MPI=1)."""
    if os.environ.get("HPCEMBED_MPI") in ("0", "1"):
        return os.environ["HPCEMBED_MPI"] == "1"
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def gather_ranks(comm) -> list[RankInfo]:
    from .slurm import SlurmTask
    slurm = SlurmTask.from_environ()
    cuda = visible_gpus()
    if slurm is not None and slurm.node:
        me = (slurm.node, slurm.gpus_on_node or cuda, cuda, slurm.het_group)
    else:
        me = (socket.gethostname(), cuda, cuda, None)
    everyone = comm.allgather(me)
    seen: dict[str, int] = {}
    ranks = []
    for rank, (h, gpus, devices, group) in enumerate(everyone):
        ranks.append(RankInfo(rank, h, seen.get(h, 0), gpus, devices, group))
        seen[h] = seen.get(h, 0) + 1
    return ranks


def plan_roles(ranks: list[RankInfo], tokenizer_ranks: int | None) -> RoleMap:
    size = len(ranks)
    if size < 3:
        raise ConfigError(f"an MPI job needs at least 3 ranks (conductor, tokenizer, gpu); this world has {size}. "
                          "Run without mpiexec for a single-process job")
    others = [r for r in ranks if r.rank != 0]
    if any(r.het_group for r in ranks):
        return _het_roles(ranks)
    if tokenizer_ranks:
        if not 1 <= tokenizer_ranks <= size - 2:
            raise ConfigError(f"--tokenizer-ranks {tokenizer_ranks} does not fit a world of {size} ranks: "
                              f"it needs the conductor, at least one gpu rank, and 1..{size - 2} tokenizers")
        n_gpu = size - 1 - tokenizer_ranks
    elif any(r.gpus_on_host for r in ranks):
        n_gpu = sum(1 for r in others if r.local_rank - (1 if r.host == ranks[0].host else 0) < r.gpus_on_host)
        if n_gpu == 0 or n_gpu == len(others):
            raise ConfigError(f"{size} ranks cannot give every GPU a rank and leave a tokenizer: start more ranks "
                              "per node than GPUs, or pass --tokenizer-ranks")
    else:
        n_gpu = max(1, len(others) // 2)
    # GPU ranks first in host-local order, so each takes its host's next device.
    def gpu_preference(r: RankInfo) -> tuple:
        local = r.local_rank - (1 if r.host == ranks[0].host else 0)
        return (local >= max(r.gpus_on_host, 1), local, r.rank)
    gpus = sorted(sorted(others, key=gpu_preference)[:n_gpu], key=lambda r: r.rank)
    gpu_ids = {r.rank for r in gpus}
    return RoleMap(conductor=0, tokenizers=[r.rank for r in others if r.rank not in gpu_ids],
                   gpus=[r.rank for r in gpus], hosts={r.rank: r.host for r in ranks})


def _het_roles(ranks: list[RankInfo]) -> RoleMap:
    tokenizers = [r.rank for r in ranks if r.rank != 0 and not r.het_group]
    gpus = [r.rank for r in ranks if r.het_group]
    if not tokenizers or ranks[0].het_group:
        raise ConfigError("a het job needs its component 0 (CPU nodes) to hold the conductor and at least one "
                          f"tokenizer rank: component 0 has {len(tokenizers) + 1} task(s)")
    return RoleMap(conductor=0, tokenizers=tokenizers, gpus=gpus, hosts={r.rank: r.host for r in ranks})


def device_for(rank: int, roles: RoleMap, ranks: list[RankInfo]) -> str:
    """The torch device of a gpu rank: its position among its host's gpu ranks, if torch sees CUDA there."""
    info = ranks[rank]
    if not info.cuda_devices:
        return "cpu"
    same_host = [g for g in roles.gpus if ranks[g].host == info.host]
    return f"cuda:{same_host.index(rank) % info.cuda_devices}"
