"""Tail stealing, the granting side: the conductor's, or a sub-conductor's for its node's tokenizer ranks.

At the end of a job the units left are each read by one tokenizer rank, and the ranks that finish first would sit
idle while the last units are read: at 1000 nodes that tail is most of a billion-row job (bench/notes/
scale_out.md). Instead, when a rank with nothing in hand asks for work and none is left, the granter asks the rank
holding the largest unit still out (SplitUnit) to give up the second half of what it has not read. That rank cuts
at a row boundary past the rows it has in hand, keeps the rows before the cut, and answers with the rest as a
piece (UnitSplit), a unit of its own (io/sources.split_unit) that the idle rank reads; pieces are split again in
their turn while each half would keep `min_rows` rows. The granter records each split before the piece is handed
out (in the ledger, or in a sub-conductor's next UnitsCommitted, which the conductor writes before the commits
it carries), so a resumed job plans the same units; every row is in exactly one unit and the commit rule is the
same. A rank that asks while it still reads a unit (it asks one unit ahead) waits until that unit is read: taking
half of another unit then would queue work behind the unit it has just begun.

The granter knows sizes, not progress: it asks the holder of the unit with the most rows (halved as the unit is
split), and among equals the one handed out last, which is the least read.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Callable

from ..io.sources import WorkUnit
from .messages import AssignUnit, NoMoreUnits, Send, SplitUnit, UnitSplit


class Stealing:
    """Every operation is O(log n) or less in the units and ranks it tracks: at the end of a job the conductor of a
    large single-plane job tracks thousands of ranks, and answers each of their messages."""

    def __init__(self, min_rows: int):
        """`min_rows`: the least rows each half of a split keeps (0: no stealing; ranks get NoMoreUnits)."""
        self.min_rows = min_rows
        self.held: dict[int, list] = {}         # unit -> [holder, rows, order]: handed out, not yet read
        self.holding: dict[int, int] = {}       # rank -> units it holds
        self.asks: dict[int, tuple[int, int]] = {}      # unit -> (its holder, the idle rank the piece is for)
        self.asked: dict[int, int] = {}         # rank -> SplitUnits to it unanswered
        self.idle: deque[int] = deque()         # ranks that asked when no unit was left and hold none
        self.reading: set[int] = set()          # ranks that asked then, but still read a unit
        self.deferred: set[int] = set()         # ranks that reported while a SplitUnit to them was unanswered
        self.stopped = False
        self.splits = 0
        self._order = 0
        self._largest: list[tuple[int, int, int]] = []     # heap of (-rows, -order, unit); stale entries skipped

    def handed(self, rank: int, unit: WorkUnit) -> None:
        self._order += 1
        self.held[unit.unit] = [rank, unit.rows, self._order]
        self.holding[rank] = self.holding.get(rank, 0) + 1
        if self.min_rows and unit.rows >= 2 * self.min_rows:
            heapq.heappush(self._largest, (-unit.rows, -self._order, unit.unit))

    def read(self, unit: int) -> list[Send]:
        """The unit's UnitRead came: its holder may now be idle."""
        entry = self.held.pop(unit, None)
        if entry is None:
            return []
        holder = entry[0]
        self.holding[holder] -= 1
        if not self.holding[holder] and holder in self.reading:
            self.reading.discard(holder)
            self.idle.append(holder)
        return self.match() if self.idle else []

    def wanting(self, rank: int) -> list[Send]:
        """`rank` asked for a unit and none is left to hand out."""
        if self.holding.get(rank):
            self.reading.add(rank)
            return []
        self.idle.append(rank)
        return self.match()

    def owes(self, rank: int) -> bool:
        """A SplitUnit to `rank` is unanswered: its answer must come in before the rank is released."""
        return self.asked.get(rank, 0) > 0

    def answered(self, source: int, message: UnitSplit, record: Callable[[int, int, WorkUnit], None],
                 draining: bool) -> tuple[list[Send], bool]:
        """A holder's answer: the piece goes to the idle rank it was asked for (or, refused, that rank waits on);
        `record(unit, cut, piece)` is called first for a split, even in a drain (the holder stops at the cut,
        and a resumed job must know it did). Returns the messages, and whether `source` may now be released
        (it reported while this answer was due)."""
        holder, thief = self.asks.pop(message.unit)
        self.asked[holder] -= 1
        out: list[Send] = []
        if message.piece is None:
            self.idle.appendleft(thief)
        else:
            self.splits += 1
            entry = self.held.get(message.unit)
            if entry is not None:                  # about what its holder has left
                entry[1] = message.piece.rows
                if message.piece.rows >= 2 * self.min_rows:
                    heapq.heappush(self._largest, (-entry[1], -entry[2], message.unit))
            record(message.unit, message.cut, message.piece)
            if not draining:
                self.handed(thief, message.piece)
                out.append(Send(thief, AssignUnit(message.piece)))
        release = source in self.deferred and not self.owes(source)
        if release:
            self.deferred.discard(source)
        return out + self.match(), release

    def stop(self) -> None:
        """A graceful stop: no more splits asked for (the Drain answers the idle ranks)."""
        self.stopped = True
        self.idle.clear()
        self.reading.clear()

    def match(self) -> list[Send]:
        """Ask holders to split for the idle ranks; NoMoreUnits to those for whom nothing is left to split."""
        if self.stopped:
            return []
        out: list[Send] = []
        while self.idle:
            victim = self._victim()
            if victim is None:
                break
            heapq.heappop(self._largest)        # asked once: re-entered only if it is split
            thief = self.idle.popleft()
            holder = self.held[victim][0]
            self.asks[victim] = (holder, thief)
            self.asked[holder] = self.asked.get(holder, 0) + 1
            out.append(Send(holder, SplitUnit(victim)))
        if self.idle and not self.asks:
            # Nothing to split and no answer to wait for: the idle ranks are done. A rank still reading its unit
            # waits; when that unit is read, it is idle and this runs again.
            out += [Send(t, NoMoreUnits()) for t in self.idle]
            self.idle.clear()
        return out

    def _victim(self) -> int | None:
        """The unit with the most rows (the newest among equals) that may be split, or None."""
        heap = self._largest
        while heap:
            rows, order, unit = heap[0]
            entry = self.held.get(unit)
            if entry is not None and entry[1] == -rows and entry[2] == -order and unit not in self.asks:
                return unit
            heapq.heappop(heap)     # read, asked already, or its size is old
        return None
