"""How ranks talk: small control messages and TokenBatch payloads, behind one interface.

`inproc` runs every role in one process (threads and queues); `mpi` runs them as MPI ranks; `ucx` carries the
token batches of an MPI job over UCX endpoints.
"""
from .base import Envelope, Transport

__all__ = ["Envelope", "Transport"]
