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

import math
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
    cores_on_host: int = 0          # cores this host offers the job (Slurm's allocation, else the affinity mask)
    gpu_name: str = ""
    pid: int = 0                    # logged with the role map, for py-spy or kill on a stuck rank


# GPU-stage throughput of one gpu rank (2 instances, fp16, CUDA graphs), measured by bench/gpu_stage.py; see
# bench/results/gpu_stage-NVIDIA_H100_80GB_HBM3.json. A GPU not listed is assumed to be as fast as an H100, which
# errs towards more tokenizer ranks. --gpu-tokens-per-s overrides it.
GPU_STAGE_TOKENS_PER_S = {"NVIDIA H100 80GB HBM3": 12.34e6}
DEFAULT_GPU_TOKENS_PER_S = 12.34e6
CORES_PER_GPU_RANK = 2              # its role loop and the host side of its instances' launches
TOKENIZER_HEADROOM = 1.15           # reading, batching and sending cost beyond the measured tokenizing


def cores_here() -> int:
    slurm = os.environ.get("SLURM_CPUS_ON_NODE")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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


def virtual_host(rank: int, size: int, nodes: int) -> str:
    """HPCEMBED_VIRTUAL_NODES=N splits one machine's ranks into N pretend nodes, for scaling studies on one box
    (`hpcembed scaling measure --virtual-nodes`): rank 0 and the first block on vnode0, then equal blocks."""
    if nodes < 1:
        raise ConfigError(f"HPCEMBED_VIRTUAL_NODES must be at least 1, got {nodes}")
    per = max(1, (size - 1) // nodes)
    return f"vnode{min(nodes - 1, max(0, rank - 1) // per)}"


def gather_ranks(comm) -> list[RankInfo]:
    from .slurm import SlurmTask
    slurm = SlurmTask.from_environ()
    cuda = visible_gpus()
    name = ""
    if cuda:
        import torch
        name = torch.cuda.get_device_name(0)
    virtual = os.environ.get("HPCEMBED_VIRTUAL_NODES", "")
    if virtual:
        me = (virtual_host(comm.Get_rank(), comm.Get_size(), int(virtual)), cuda, cuda, None)
    elif slurm is not None and slurm.node:
        me = (slurm.node, slurm.gpus_on_node or cuda, cuda, slurm.het_group)
    else:
        me = (socket.gethostname(), cuda, cuda, None)
    everyone = comm.allgather(me + (cores_here(), name, os.getpid()))
    seen: dict[str, int] = {}
    ranks = []
    for rank, (h, gpus, devices, group, cores, gpu_name, pid) in enumerate(everyone):
        ranks.append(RankInfo(rank, h, seen.get(h, 0), gpus, devices, group, cores, gpu_name, pid))
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


@dataclass
class RatePlan:
    """How many tokenizer ranks the gpu ranks need, from measured rates (the seed's auto-scaling)."""
    gpu_ranks: int
    gpu_tokens_per_s: float         # per gpu rank
    gpu_rate_source: str
    tokenizer_tokens_per_s: float   # per tokenizer rank (one core), measured on the conductor
    needed: int                     # tokenizer ranks that keep every gpu rank busy, with headroom
    chosen: int                     # what the world and its cores allow
    available: int

    @property
    def expected_gpu_busy(self) -> float:
        return min(1.0, self.chosen * self.tokenizer_tokens_per_s / (self.gpu_ranks * self.gpu_tokens_per_s))

    def describe(self) -> str:
        text = (f"plan: {self.gpu_ranks} gpu rank(s) at {self.gpu_tokens_per_s / 1e6:.2f}M tokens/s each "
                f"({self.gpu_rate_source}); a tokenizer rank does {self.tokenizer_tokens_per_s / 1e6:.2f}M "
                f"tokens/s (measured on rank 0), so {self.needed} tokenizer ranks keep them busy; using "
                f"{self.chosen} of {self.available} candidates, expected gpu busy {self.expected_gpu_busy:.0%}")
        if self.expected_gpu_busy < 0.9:
            text += (f". CPU-bound: give the job {self.needed - self.chosen} more cores for tokenizer ranks, "
                     "or tokenize in a separate job (hpcembed tokenize)")
        return text


def plan_tokenizers(roles: RoleMap, ranks: list[RankInfo], tokenizer_tokens_per_s: float,
                    gpu_tokens_per_s: float = 0.0) -> tuple[RoleMap, RatePlan]:
    """Keep as many of `roles`' tokenizer ranks as the gpu ranks need at measured rates, within each host's
    cores (a gpu rank keeps CORES_PER_GPU_RANK, the conductor one); the rest of the ranks stay idle."""
    gpus = roles.gpus
    names = {ranks[g].gpu_name for g in gpus} - {""}
    if gpu_tokens_per_s:
        source = "--gpu-tokens-per-s"
    elif len(names) == 1 and next(iter(names)) in GPU_STAGE_TOKENS_PER_S:
        gpu_tokens_per_s, source = GPU_STAGE_TOKENS_PER_S[next(iter(names))], f"measured on {next(iter(names))}"
    else:
        gpu_tokens_per_s = DEFAULT_GPU_TOKENS_PER_S
        source = f"assumed H100 figure for {', '.join(sorted(names)) or 'unknown GPU'}"
    needed = math.ceil(len(gpus) * gpu_tokens_per_s * TOKENIZER_HEADROOM / max(tokenizer_tokens_per_s, 1.0))
    # Cores left for tokenizers on each host, then candidates taken round-robin over hosts (rank order within).
    free = {}
    for r in ranks:
        if r.host not in free:
            on_host = [g for g in gpus if ranks[g].host == r.host]
            free[r.host] = max(0, (r.cores_on_host or 1) - CORES_PER_GPU_RANK * len(on_host)
                               - (1 if ranks[0].host == r.host else 0))
    by_host: dict[str, list[int]] = {}
    for t in roles.tokenizers:
        by_host.setdefault(ranks[t].host, []).append(t)
    usable = {h: ts[: free[h]] for h, ts in by_host.items()}
    available = sum(len(ts) for ts in usable.values())
    chosen: list[int] = []
    queues = [list(ts) for ts in usable.values()]
    while len(chosen) < min(needed, available):
        for q in queues:
            if q and len(chosen) < needed:
                chosen.append(q.pop(0))
    plan = RatePlan(len(gpus), gpu_tokens_per_s, source, tokenizer_tokens_per_s, needed, len(chosen), available)
    if not chosen:          # a host with no spare cores still needs one tokenizer to make progress
        chosen = roles.tokenizers[:1]
        plan.chosen = 1
    return RoleMap(roles.conductor, sorted(chosen), gpus, roles.hosts), plan


def measure_tokenizer_rate(backend, texts: list[str], seconds: float = 1.0) -> float:
    """Tokens per second of one tokenizer rank's backend on this core (call with RAYON_NUM_THREADS=1)."""
    import time

    from .tokenize.batch import TokenBatch
    backend.encode(texts[:64])          # warm up
    tokens, start = 0, time.perf_counter()
    while True:
        for k in range(0, len(texts), 1024):
            chunk = texts[k: k + 1024]
            batch = TokenBatch.build(backend.encode(chunk), [""] * len(chunk), list(range(len(chunk))), 0)
            tokens += batch.num_tokens
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or not texts:
            return tokens / elapsed if elapsed else 0.0
