"""Bulk requests' heavy steps (parsing a large body, sending its pieces, building its answer) one per turn of the
event loop, so that a query is never held up by more than one of them.

asyncio runs, in one turn of its loop, every callback that was ready when the turn began, and only then looks at
the sockets again. Under bulk load a turn can hold a dozen bulk steps of 1-3 ms each (their answers come back from
the encoder ranks together), and a query that arrives meanwhile is not read until all of them are done: on the
H200 box the frontend's loop woke more than 10 ms late 6-13 times in 6 s of queries under bulk load
(bench/notes/serve.md). Each heavy bulk step first waits for its turn here; a turn wakes one waiter and hands the
next turn to the next one, so the loop looks at its sockets between any two of them. HPCEMBED_BULK_TURNS=0 lets
every step run as soon as it can, for measuring the difference.
"""
from __future__ import annotations

import asyncio
import os
from collections import deque


class BulkTurns:
    def __init__(self):
        self._waiting: deque[asyncio.Future] = deque()
        self._scheduled = False
        self.enabled = os.environ.get("HPCEMBED_BULK_TURNS", "1") != "0"

    async def turn(self) -> None:
        """Return in a turn of the loop in which no other bulk step has been let through."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._next)
        await waiter

    def _next(self) -> None:
        # Callbacks scheduled during a turn run in the next one: the waiter woken here runs its step there, and
        # this, scheduled again, wakes the following waiter one turn later still.
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():           # a waiter whose request was cancelled is skipped
                waiter.set_result(None)
                break
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._next)
        else:
            self._scheduled = False
