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
    # The most gpu ranks one tokenizer rank sends to. Links are sparse so that a rank's endpoints stay few at any
    # scale (UCX's RC transport manages ~256 endpoints per process; 8,000 gpu ranks cannot all be peers), and so
    # that credit grants do not grow as gpus x tokenizers.
    fanout: int = 8
    _links: tuple | None = field(default=None, repr=False, compare=False)

    def role_of(self, rank: int) -> str:
        """'idle' is a rank the plan did not need (more tokenizers than the GPUs can take, see world.py)."""
        if rank == self.conductor:
            return "conductor"
        return "tokenizer" if rank in self.tokenizers else "gpu" if rank in self.gpus else "idle"

    def host_of(self, rank: int) -> str:
        return self.hosts.get(rank, socket.gethostname())

    def gpus_of(self, tokenizer: int) -> list[int]:
        """The gpu ranks this tokenizer rank sends its batches to, its own host's first."""
        return self._link_plan()[0].get(tokenizer, [])

    def tokenizers_of(self, gpu: int) -> list[int]:
        """The tokenizer ranks that send to this gpu rank (the ranks it grants credit to)."""
        return self._link_plan()[1].get(gpu, [])

    def _link_plan(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Each tokenizer links to its host's gpu ranks, then to remote ones dealt out in turn, so every gpu rank
        gets about the same number of tokenizers. Where tokenizers x fanout is smaller than the number of gpu
        ranks the fanout grows, so that no gpu rank is left without a tokenizer."""
        if self._links is None:
            gpus, tokenizers = self.gpus, self.tokenizers
            fanout = max(self.fanout, -(-len(gpus) // max(len(tokenizers), 1)))
            by_host: dict[str, list[int]] = {}
            for g in gpus:
                by_host.setdefault(self.host_of(g), []).append(g)
            to_gpus: dict[int, list[int]] = {}
            turn, host_turn = 0, {h: 0 for h in by_host}
            for t in tokenizers:
                host = self.host_of(t)
                local = by_host.get(host, [])
                # Where a host has more gpu ranks than the fanout, its tokenizers take turns over them.
                mine = [local[(host_turn.get(host, 0) + k) % len(local)] for k in range(min(fanout, len(local)))]
                if local:
                    host_turn[host] += len(mine)
                picked = list(mine)
                want = min(fanout, len(gpus))
                while len(picked) < want:
                    g = gpus[turn % len(gpus)]
                    turn += 1
                    if g not in mine:
                        picked.append(g)
                to_gpus[t] = picked
            to_tokenizers: dict[int, list[int]] = {}
            for t, gs in to_gpus.items():
                for g in gs:
                    to_tokenizers.setdefault(g, []).append(t)
            self._links = (to_gpus, to_tokenizers)
        return self._links


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
