"""Launchers x job kinds: `run(cfg, kind)` runs a job in this process, or as this rank of an MPI world when
launched by mpiexec or srun, and returns its manifest (None on ranks other than the conductor)."""
from __future__ import annotations

from ..config import JobConfig
from .kinds import KINDS, EmbedJob, JobKind, TokenizeJob

__all__ = ["run", "KINDS", "EmbedJob", "TokenizeJob", "JobKind"]


def run(cfg: JobConfig, kind: JobKind) -> dict | None:
    from ..world import under_mpi
    if under_mpi():
        from .mpi import run_mpi
        return run_mpi(cfg, kind)
    from .inproc import run_in_process
    return run_in_process(cfg, kind)
