"""The transport interface every role loop is written against."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from ..tokenize.batch import TokenBatch


@dataclass
class Envelope:
    source: int
    message: Any          # a control message from roles.messages, or a TokenBatch


class Transport(abc.ABC):
    rank: int
    size: int
    name: str

    @abc.abstractmethod
    def send(self, dest: int, message: Any) -> None:
        """Send a small control message (pickled where it crosses processes)."""

    @abc.abstractmethod
    def send_batch(self, dest: int, batch: TokenBatch) -> None:
        """Send a token batch on the data path: raw buffers, never pickled."""

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> Envelope | None:
        """The next message for this rank: None if nothing came within `timeout` (0 polls, None waits).

        Raises JobAborted once the job has been aborted."""

    @abc.abstractmethod
    def abort(self, reason: str, exit_code: int) -> None:
        """End the whole job now; every rank's recv raises JobAborted (in-process) or the processes end (MPI)."""
