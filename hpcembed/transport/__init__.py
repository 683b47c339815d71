"""How roles talk: small control messages and TokenBatch payloads, behind one interface.

`inproc` runs every role in one process (threads and queues); `mpi` runs them as MPI ranks.
"""
from .base import Envelope, Transport

__all__ = ["Envelope", "Transport"]
