"""Who am I: what this process learns of the world it runs in (MPI launcher variables, Slurm, the hosts, cores
and GPUs), gathered into the RankInfo list that topology.py plans roles from.

Under Slurm, hosts are Slurm node names and their GPUs are the ones Slurm allocated (slurm.py); the device an
encoder rank uses is CUDA if torch sees any, else CPU (so CI's fake gres GPUs run the encoder on CPU).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

from .errors import ConfigError
from .topology import RankInfo


def cores_here() -> int:
    slurm = os.environ.get("SLURM_CPUS_ON_NODE")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def launched_on_one_host() -> bool:
    """True when the launcher says every rank of the job runs on this host (Hydra's and Open MPI's local rank
    counts, or a one-node Slurm step), so token batches cannot cross a node; False when it says otherwise or says
    nothing. Known before MPI starts, which is when the UCX bindings would have to be loaded."""
    virtual = os.environ.get("HPCEMBED_VIRTUAL_NODES", "")
    if virtual and virtual != "1":          # pretend nodes (or a bad value, which gather_ranks reports)
        return False
    for world, local in (("PMI_SIZE", "MPI_LOCALNRANKS"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")):
        if os.environ.get(world, "").isdigit() and os.environ.get(local, "").isdigit():
            return int(os.environ[world]) == int(os.environ[local])
    return os.environ.get("SLURM_STEP_NUM_NODES") == "1"


def process_start_ticks(pid: int | str = "self") -> int | None:
    """A process's start, in clock ticks after boot, from /proc (None if it is gone, or off Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # Field 22 is the start time; the command name (field 2) may hold spaces and parentheses.
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_started_at() -> float | None:
    """When this process started (epoch seconds, to the kernel's clock tick): start-up is measured from here,
    since imports and MPI initialisation come before any code of ours runs. None off Linux."""
    ticks = process_start_ticks()
    if ticks is None or not hasattr(time, "CLOCK_BOOTTIME"):
        return None
    # The kernel counts it on the boot-time clock (its btime is whole seconds only).
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the pip MPICH's), else the first on PATH."""
    return shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def mpiexec_command(ranks: int) -> list[str]:
    """`mpiexec -n RANKS` for runs on one machine: Open MPI also needs leave to oversubscribe, to leave ranks
    unbound and (as root, in containers) to run at all."""
    exe = find_mpiexec()
    if not exe:
        raise ConfigError("mpiexec not found (pip install 'hpcembed[mpi]')")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    cmd = [exe, "-n", str(ranks)]
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe", "--bind-to", "none"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


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
    """Every rank's host, GPUs, cores and pid, on every rank. Of the ranks of a machine that see the same GPUs
    (the same CUDA_VISIBLE_DEVICES), one asks torch what they are: importing torch and initialising CUDA takes
    seconds, more when all of a node's ranks do it at once, and only the encoder ranks need torch after that.
    Ranks that Slurm binds to GPUs of their own each ask for themselves. Not rank 0 where another rank can ask:
    the conductor needs no torch, and its machine's first other rank is most often an encoder rank (plan_roles)."""
    from .slurm import SlurmTask
    slurm = SlurmTask.from_environ()
    machine = socket.gethostname()
    sees = (machine, os.environ.get("CUDA_VISIBLE_DEVICES"))
    alike = [r for r, other in enumerate(comm.allgather(sees)) if other == sees]
    asker = next((r for r in alike if r != 0), 0)
    mine = _gpus_here() if asker == comm.Get_rank() else None
    quiet_barrier(comm)
    answers = comm.allgather(mine)
    cuda, name = answers[asker]
    virtual = os.environ.get("HPCEMBED_VIRTUAL_NODES", "")
    if virtual:
        if not virtual.isdigit():
            raise ConfigError(f"HPCEMBED_VIRTUAL_NODES must be a whole number of nodes, got {virtual!r}")
        me = (virtual_host(comm.Get_rank(), comm.Get_size(), int(virtual)), cuda, cuda, None)
    elif slurm is not None and slurm.node:
        me = (slurm.node, slurm.gpus_on_node or cuda, cuda, slurm.het_group)
    else:
        me = (machine, cuda, cuda, None)
    everyone = comm.allgather(me + (cores_here(), name, os.getpid()))
    seen: dict[str, int] = {}
    ranks = []
    for rank, (h, gpus, devices, group, cores, gpu_name, pid) in enumerate(everyone):
        ranks.append(RankInfo(rank, h, seen.get(h, 0), gpus, devices, group, cores, gpu_name, pid))
        seen[h] = seen.get(h, 0) + 1
    return ranks


def quiet_barrier(comm, poll_s: float = 0.005) -> None:
    """A barrier that sleeps while it waits. A rank blocked in an MPI collective spins a core: while another rank
    spends seconds importing torch, or works on, the spinning takes a core from it where ranks share cores, and from
    the node's other work elsewhere. Every rank must use this one at a given point (blocking and non-blocking
    collectives do not match each other)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll_s)


def closing_barrier(comm, complete: bool, poll_s: float = 0.005) -> bool:
    """The world's last meeting, a barrier that also tells every rank whether the conductor (rank 0) found the job
    complete (the others pass False): an allreduce of the largest vote, sleeping while it waits like
    quiet_barrier."""
    import numpy as np
    from mpi4py import MPI
    vote, verdict = np.array([int(complete and comm.Get_rank() == 0)], dtype=np.int32), np.zeros(1, dtype=np.int32)
    request = comm.Iallreduce(vote, verdict, op=MPI.MAX)
    while not request.Test():
        time.sleep(poll_s)
    return bool(verdict[0])


def _gpus_here() -> tuple[int, str]:
    """The CUDA devices torch sees on this machine, and the first one's name."""
    cuda = visible_gpus()
    if not cuda:
        return 0, ""
    import torch
    return cuda, torch.cuda.get_device_name(0)


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
