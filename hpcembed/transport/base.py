"""The transport interface every real-time driver is written against: in-process queues (one process and
tests), MPI messages, or UCX endpoints for the token batches. The protocol cores never see it."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from ..tokenize.batch import TokenBatch


@dataclass
class Envelope:
    source: int
    message: Any          # a control message from protocol.messages, or a TokenBatch


class Transport(abc.ABC):
    rank: int
    size: int
    name: str
    # recv() takes urgent messages before others where the transport can tell them apart (MPI: by tag); set by
    # a rank that expects them. Transports that cannot keep the order of arrival.
    urgent_first: bool = False

    @abc.abstractmethod
    def send(self, dest: int, message: Any, urgent: bool = False, prompt: bool = False) -> None:
        """Send a small control message (pickled where it crosses processes) without waiting for `dest` to take
        it: `dest` may be busy for a while, and a rank that serves many peers must not stall on one. Messages
        from one rank to another arrive in the order sent; flush() waits until all have been taken.

        `urgent`: where the receiver takes urgent messages first (`urgent_first`), this one overtakes every
        message that is not urgent (a live query's, past bulk work). Urgent control messages keep their order among
        themselves, as urgent batches do.

        `prompt`: the receiver may take this one with recv_prompt() while it takes nothing else, ahead of batches
        and other messages from the same sender (prompt ones keep their order among themselves). Only for a
        message whose handling does not depend on what its sender sent before it: a dedup Claim, which a rank
        with a full window must still answer. The receiver looks for them often, and the sender may wait until
        it has taken one (MPI: a blocking send), so that none is left half sent while the sender computes."""

    @abc.abstractmethod
    def send_batch(self, dest: int, batch: TokenBatch, urgent: bool = False) -> None:
        """Send a token batch on the data path: raw buffers, never pickled. `urgent` as for send()."""

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> Envelope | None:
        """The next message for this rank: None if nothing came within `timeout` (0 polls, None waits).

        Raises JobAborted once the job has been aborted."""

    def recv_prompt(self) -> Envelope | None:
        """A prompt message (see send) that has arrived, without waiting; None if there is none. A transport
        that cannot tell them apart returns None, and delivers them through recv() in the order sent."""
        return None

    @abc.abstractmethod
    def abort(self, reason: str, exit_code: int) -> None:
        """End the whole job now; every rank's recv raises JobAborted (in-process) or the processes end (MPI)."""

    def connect(self, peers: list[int], hosts: dict[int, str], receives_from: list[int]) -> None:
        """Open the data path to `peers` (collective where the transport needs it); `receives_from`: the peers
        whose batches this rank takes. Transports whose data path needs no set-up do nothing."""

    def flush(self) -> None:
        """Wait until every control message and batch this rank sent has been taken or has left its buffers."""

    def close(self) -> None:
        """Release what the transport holds; called by every rank after the job's final barrier."""
