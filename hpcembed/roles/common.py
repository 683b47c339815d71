"""What every role shares: who plays which role, and how a role's failure reaches the conductor."""
from __future__ import annotations

import logging
import socket
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EXIT_FAILED, HpcEmbedError, JobAborted
from ..transport.base import Transport
from .messages import Failure

log = logging.getLogger("hpcembed")


@dataclass
class RoleMap:
    conductor: int
    tokenizers: list[int]
    gpus: list[int]
    hosts: dict[int, str] = field(default_factory=dict)

    def role_of(self, rank: int) -> str:
        """'idle' is a rank the plan did not need (more tokenizers than the GPUs can take, see world.py)."""
        if rank == self.conductor:
            return "conductor"
        return "tokenizer" if rank in self.tokenizers else "gpu" if rank in self.gpus else "idle"

    def host_of(self, rank: int) -> str:
        return self.hosts.get(rank, socket.gethostname())


def run_role(name: str, transport: Transport, conductor: int, body: Callable[[], None]) -> None:
    """Run a role loop; on failure tell the conductor, which ends the job, instead of dying silently."""
    try:
        body()
    except JobAborted:
        pass
    except HpcEmbedError as exc:
        log.debug("rank %d (%s) failed: %s", transport.rank, name, exc)
        transport.send(conductor, Failure(transport.rank, name, str(exc), exc.exit_code))
    except BaseException as exc:  # noqa: BLE001 - any crash must end the job, not hang it
        # The traceback goes to this rank's log; the conductor prints the one-line summary for the job.
        log.error("rank %d (%s) crashed:\n%s", transport.rank, name, traceback.format_exc().rstrip())
        transport.send(conductor, Failure(transport.rank, name, f"internal error: {type(exc).__name__}: {exc}",
                                          EXIT_FAILED))
