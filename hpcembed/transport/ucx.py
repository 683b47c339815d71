"""UCX transport: token batches move tokenizer -> gpu over UCX endpoints (RDMA where the UCX build has verbs;
TCP with the pip wheel); control messages stay on MPI, where they are small pickles.

Bootstrap through MPI: each tokenizer and encoder rank opens one UCX worker and sends its worker address only to the
ranks it is linked with (RoleMap.gpus_of / tokenizers_of), with one sparse all-to-all; then each creates
endpoints to those peers only. Worker addresses rather than listener ip:port pairs: an address carries every
interface UCX can use, so nothing has to pick the right IP on a multi-homed node, and it needs no rdmacm, which
many site UCX builds and the pip wheel lack.

A batch is two tagged messages: a 2-int64 header (payload bytes, batch count) and then the payload, the same
packed layout as the MPI transport (TokenBatch.to_wire). The encoder rank keeps a header receive posted per linked
tokenizer; when one completes it posts the payload receive into an array of exactly that size, which becomes the
batch's arrays without a copy (TokenBatch.from_wire makes views). Sends do not block: UCX's progress thread (C++, no GIL)
moves them while the tokenizer tokenizes the next chunk, and the buffers are held until they complete.

Ordering: batches travel on UCX and UnitEnd on MPI, so a UnitEnd may arrive before a unit's last batch. The gpu
rank counts rows (UnitEnd carries the row count), so that order does not matter. Every credit comes back over
MPI after the batch was consumed, so a tokenizer never finishes with a batch still in flight.

A linked peer whose endpoint closes before the job's final barrier has died (or its node has): the next recv or
send raises TransportError naming it, and the conductor ends the job instead of waiting for rows that will never
come.
"""
from __future__ import annotations

import os
import time
from collections import deque

import numpy as np

from ..errors import ConfigError, TransportError
from ..tokenize.batch import TokenBatch
from .base import Envelope
from .mpi import MpiAlltoall, MpiTransport

_HEADER, _PAYLOAD = 1, 2


def import_ucx():
    """Import UCX's bindings. It must happen before mpi4py.MPI is loaded: both pip MPI wheels bundle their own
    UCX, and loading theirs first leaves ucxx with unresolved symbols (libuct: ucs_ifname_to_ndev_index)."""
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    # Batches go eagerly up to 16 MB unless the site says otherwise. A rendezvous costs extra round trips, and
    # each one waits for the progress thread to wake: a 16-row batch took 1.2 ms one way by rendezvous and 42 us
    # eagerly (bench/transport.py). Credits bound what can arrive unexpected, so memory stays bounded. (Set in
    # the environment: UCXContext's config dict did not change this threshold in ucxx 0.52.)
    os.environ.setdefault("UCX_RNDV_THRESH", "16M")
    import ucxx._lib.libucxx as ucx                   # noqa: F401 - the low-level, synchronous API
    return ucx


def ucx_available() -> bool:
    try:
        import_ucx()
        return True
    except ImportError:
        return False


def _tag(source: int, kind: int):
    from ucxx._lib.libucxx import UCXXTag
    return UCXXTag((source << 2) | kind)


class UcxTransport(MpiTransport):
    name = "ucx"

    def __init__(self, comm=None):
        try:
            self.ucx = import_ucx()
        except ImportError as exc:
            raise ConfigError(f"--transport ucx needs the ucxx bindings ({exc}): pip install 'hpcembed[ucx]'") from exc
        from ucxx._lib.arr import Array
        self.Array = Array
        super().__init__(comm)
        self.worker = None
        self.endpoints: dict[int, object] = {}
        self.hosts: dict[int, str] = {}
        self._sending: deque[tuple] = deque()             # (requests, buffers kept alive until sent, dest)
        self._headers: dict[int, tuple] = {}              # source -> (request, header array)
        self._payloads: deque[tuple] = deque()            # (source, request, payload array), in arrival order
        self._lost: list[int] = []                        # peers whose endpoint closed (appended by UCX's thread)
        self._closing = False

    def connect(self, peers: list[int], hosts: dict[int, str], receives_from: list[int]) -> None:
        """Collective over the communicator: every rank calls it, ranks off the data path with no peers.
        `peers`: the ranks to open endpoints to; `receives_from`: those whose batches this rank takes."""
        ucx = self.ucx
        self.hosts = hosts
        if peers:
            context = ucx.UCXContext({}, (ucx.Feature.TAG, ucx.Feature.WAKEUP))
            self.worker = ucx.UCXWorker(context, enable_delayed_submission=False)
            # A blocking (epoll) progress thread: it sleeps while nothing moves, so it takes no core from the
            # tokenizers; the timeout bounds how late it notices a request posted from this thread.
            self.worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        mine = np.frombuffer(self.worker.address.tobytes(), np.uint8) if peers else np.empty(0, np.uint8)
        wanted = set(peers)
        addresses = MpiAlltoall(self.comm)([mine if p in wanted else np.empty(0, np.uint8)
                                            for p in range(self.size)])
        for p in peers:
            address = ucx.UCXAddress.create_from_buffer(addresses[p].tobytes())
            ep = self.worker.create_endpoint_from_worker_address(address, True)
            ep.set_close_callback(self._lost.append, (p,))
            self.endpoints[p] = ep
        for source in receives_from:
            self._post_header(source)

    def _post_header(self, source: int) -> None:
        header = np.empty(2, dtype=np.int64)
        self._headers[source] = (self.worker.tag_recv(self.Array(header), _tag(source, _HEADER)), header)

    def _check_peers(self, doing: str) -> None:
        if self._lost and not self._closing:
            peer = self._lost[0]
            raise TransportError(f"rank {self.rank}: the UCX connection to rank {peer} (on "
                                 f"{self.hosts.get(peer, '?')}) closed while {doing}: that rank or its node died")

    def send_batch(self, dest: int, batch: TokenBatch, urgent: bool = False) -> None:
        if urgent:              # the urgent tags are MPI's; a query's batch is small
            return super().send_batch(dest, batch, urgent=True)
        self._check_peers("sending")
        self._reap_sends(wait=False)
        payload = batch.to_wire()
        header = np.array([payload.nbytes, 1], dtype=np.int64)
        ep = self.endpoints[dest]
        requests = (ep.tag_send(self.Array(header), _tag(self.rank, _HEADER)),
                    ep.tag_send(self.Array(payload), _tag(self.rank, _PAYLOAD)))
        self._sending.append((requests, (header, payload), dest))

    def _reap_sends(self, wait: bool) -> None:
        while self._sending:
            requests, _, dest = self._sending[0]
            if not all(r.completed for r in requests):
                if not wait:
                    return
                self._check_peers(f"sending to rank {dest}")
                time.sleep(0.0002)
                continue
            for r in requests:
                r.check_error()
            self._sending.popleft()

    def _poll_data(self) -> Envelope | None:
        self._check_peers("receiving")
        self._reap_sends(wait=False)
        for source, (request, header) in list(self._headers.items()):
            if request.completed:
                request.check_error()
                payload = np.empty(int(header[0]), dtype=np.uint8)
                self._payloads.append((source, self.worker.tag_recv(self.Array(payload), _tag(source, _PAYLOAD)),
                                       payload))
                self._post_header(source)
        for i, (source, request, payload) in enumerate(self._payloads):
            if request.completed:        # whichever finished first: a slow sender holds up no one else
                del self._payloads[i]
                request.check_error()
                return Envelope(source, TokenBatch.from_wire(payload))
        return None

    def flush(self) -> None:
        """Wait until every batch this rank sent has left its buffers (and every control message has gone)."""
        self._reap_sends(wait=True)
        super().flush()

    def close(self) -> None:
        """After the final barrier: peers closing their endpoints from here on is the job ending, not a death."""
        self._closing = True
        if self.worker is not None:
            for ep in self.endpoints.values():
                ep.remove_close_callback()
            self.worker.cancel_inflight_requests()       # the header receives still posted
            self.worker.stop_progress_thread()
            self.endpoints.clear()
            self._headers.clear()
            self.worker = None
