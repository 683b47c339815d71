"""What every real-time driver shares: delivering a core's messages, and how a rank's failure reaches the
conductor."""
from __future__ import annotations

import logging
import traceback
from typing import Callable, Iterable

from ..errors import EXIT_FAILED, HpcEmbedError, JobAborted
from ..protocol.messages import Failure, Send
from ..transport.base import Transport

log = logging.getLogger("hpcembed")


def deliver(transport: Transport, sends: Iterable[Send], prompt: bool = False) -> None:
    """`prompt`: the receivers may take these ahead of what the sender sent before (Transport.send)."""
    for dest, message in sends:
        transport.send(dest, message, prompt=prompt)


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
