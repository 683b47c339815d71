"""`hpcembed serve`'s entry: in one process, or as a rank of an mpiexec or srun world (serve/ranks.py)."""
from __future__ import annotations

import asyncio

from ..config import JobConfig
from .options import ServeOptions


def serve(cfg: JobConfig, opts: ServeOptions) -> int:
    from ..world import under_mpi
    if under_mpi():
        from .ranks import serve_mpi
        return serve_mpi(cfg, opts)
    from .server import Service
    return asyncio.run(Service(cfg, opts).run())
