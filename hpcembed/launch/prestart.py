"""What a rank does before MPI is initialised, where that shortens start-up.

Open MPI's MPI_Init ends in a barrier across the world, and mpi4py holds the GIL through it, so a rank that
reaches it early waits there doing nothing, and no thread of its own runs meanwhile. An encoder rank's own path to
its first batch is Python and imports, MPI, importing torch and initialising CUDA (seconds), then building; rank
0's is MPI, then the tokenizer-rate probe and planning. Done before MPI_Init instead, the torch import and the
probe take the place of that barrier's wait: the other ranks are still starting Python and reaching it.

Which rank will be an encoder rank is decided after MPI is up (topology.plan_roles: the first ranks of each host
with GPUs, rank 0 aside, one per GPU). Before it, the launcher's environment gives the rank's place on its host,
and the GPUs are counted without CUDA, so the guess is that rule applied to those. With ranks laid out by host
(mpiexec's and srun's default) it is exact; under another layout a wrong guess costs one rank a torch import it did
not need, and a missed one costs what it costs today.

HPCEMBED_PRESTART=0 leaves both to after MPI_Init, as before (for A/B runs: bench/e2e_node.py --variants).
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import JobConfig
from .kinds import JobKind

# The launcher's world rank and host-local rank: Open MPI, PMIx, MPICH/Hydra, Slurm's srun, HPE Cray PALS.
_WORLD_RANK = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "PALS_RANKID")
_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PALS_LOCAL_RANKID")
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass
class Prestart:
    """What was done before MPI_Init, with the epoch seconds each step ended (start-up marks)."""
    marks: dict[str, float]
    probe: object = None            # planning.EarlyRateProbe, on the rank that will be the conductor


def launcher_ranks(environ=os.environ) -> tuple[int, int] | None:
    """(world rank, host-local rank) as the launcher sets them, or None where it sets neither."""
    def first(names):
        for name in names:
            value = environ.get(name, "")
            if value.isdigit():
                return int(value)
        return None
    world, local = first(_WORLD_RANK), first(_LOCAL_RANK)
    return None if world is None or local is None else (world, local)


def gpus_without_cuda(environ=os.environ, nvidia_gpus: Path = _NVIDIA_GPUS) -> int:
    """The GPUs this process may use, counted without initialising CUDA: CUDA_VISIBLE_DEVICES where it is set
    (CUDA stops reading it at the first entry that is not a device, such as -1), else the NVIDIA driver's list."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-") or entry.lower() == "nodevfiles":
                break
            count += 1
        return count
    try:
        return sum(1 for _ in nvidia_gpus.iterdir())
    except OSError:
        return 0


def likely_encoder_rank(world: int, local: int, gpus: int) -> bool:
    """plan_roles' rule, guessed before MPI: on the host that holds rank 0 (with ranks laid out by host, the one
    whose world and local ranks agree) local ranks 1..gpus, on any other host local ranks 0..gpus-1."""
    if gpus <= 0 or world == 0:
        return False
    return 1 <= local <= gpus if world == local else local < gpus


def wants_encoders_here(cfg: JobConfig, kind: JobKind) -> bool:
    """A job that would build CUDA encoders at all (not a rehearsal, a CPU job, or a token-only job, nor a rerun
    of a complete one, which has nothing to build for)."""
    from ..io.writer import OutputDir
    if not kind.has_encoders or cfg.rehearse or not (cfg.device == "auto" or cfg.device.startswith("cuda")):
        return False
    return cfg.overwrite or not OutputDir(cfg.output).complete()


def before_mpi(cfg: JobConfig, kind: JobKind, environ=os.environ) -> Prestart:
    """Start what this rank can before MPI_Init (see the module's docstring). Never raises: whatever fails here is
    done again, and reported, where it was done before."""
    marks: dict[str, float] = {}
    ranks = launcher_ranks(environ)
    if ranks is None or environ.get("HPCEMBED_PRESTART", "1") == "0":
        return Prestart(marks)
    world, local = ranks
    gpus = gpus_without_cuda(environ)
    probe = None
    try:
        if world == 0 and gpus:
            # Where this machine has GPUs, ranks beside it are importing torch, and MPI_Init would wait for them.
            # Waited for here: its thread would not run while MPI_Init holds the GIL.
            from .planning import EarlyRateProbe
            probe = EarlyRateProbe(cfg, kind)
            if probe.started:
                probe.result()
                marks["probe_done"] = time.time()
        elif likely_encoder_rank(world, local, gpus) and wants_encoders_here(cfg, kind):
            importlib.import_module("hpcembed.engine.build")  # torch, Triton and the encoders' modules
            from ..world import gpus_here
            gpus_here()                             # the GPU census' answer, kept for gather_ranks
            marks["torch_imported"] = time.time()
    except Exception:       # noqa: BLE001 - the census, the plan and the build do it again and report
        pass
    return Prestart(marks, probe)
