"""A sub-conductor's protocol core: one node's share of the conductor's work, for jobs of hundreds of nodes.

One conductor handles every unit's messages (a RequestUnit, a UnitRead and a PartWritten from each encoder rank the
unit reached) and writes every ledger record; at thousands of encoder ranks and units of 20,000 rows that is more
than one core can do (scaling_results/h100-box/notes.md). A sub-conductor serves the tokenizer ranks of its host:
  - units: it asks the conductor for a block at a time (RequestUnits) and hands them out one by one as its
    tokenizers ask (AssignUnit), asking for the next block while it still has a few left. The conductor grants
    no more than the node's share of the job; a grant short of the block means units are few for the ranks, and
    they are cut into a piece for each rank waiting (_share_stock);
  - the commit rule: its tokenizers' UnitRead and the encoder ranks' PartWritten for their units come here (the
    same rule as the conductor's, protocol/conductor.UnitParts), and each complete unit's ledger record goes up
    in a batch (UnitsCommitted), sent when it holds `commit_batch` units, when the oldest has waited
    `commit_seconds`, or at once when nothing else is in flight. Up is the conductor for the first
    RoleMap.commit_fanin sub-conductors and another sub-conductor for the rest (RoleMap.commit_parent), which
    merges its children's batches with its own and sends them on when they would be due together (all its
    children past their last commit, or the batch or the wait filled). At the end of a job every node commits at
    once: at 1000 nodes rank 0 then took 1000 batches (each about 100 µs of its CPU, bench/notes/scale_out.md),
    and through the tree about 32. A unit is committed only when the conductor writes its record, so a
    sub-conductor that dies loses nothing that was committed;
  - tail stealing (protocol/stealing.py) among its tokenizers once the conductor has no more units: the splits
    go to the conductor in the next UnitsCommitted, ahead of the commits it carries;
  - the end: it releases its tokenizers when they report, and reports them, itself and the sub-conductors below
    it in one message (RankReports) once every unit it knows of is committed and sent on and those below have
    reported; a Drain or a Release from above is passed to its tokenizers and the sub-conductors below.
It sends nothing itself: `handle` and `poll` return the messages, with the time passed in by the driver
(roles/subconductor.py in real time, scaling/sim.py in virtual time).
"""
from __future__ import annotations

from array import array
from collections import deque

from ..io.ledger import CommittedUnit, Ledger
from ..io.sources import WorkUnit, split_unit
from ..manifest import RankStats
from ..topology import RoleMap
from .conductor import UnitParts
from .messages import (AssignUnit, Drain, NoMoreUnits, PartWritten, RankReport, RankReports, Release, RequestUnit,
                       RequestUnits, Send, UnitGrant, UnitRead, UnitsCommitted, UnitSplit)
from .stealing import Stealing

COMMIT_BATCH = 64           # units per UnitsCommitted at most
COMMIT_SECONDS = 0.5        # the longest a complete unit waits here before it is sent on, up to 250 sub-conductors
CONDUCTOR_BATCHES_PER_S = 500


def commit_seconds_for(roles: RoleMap) -> float:
    """How long a complete unit may wait for others to share its UnitsCommitted: COMMIT_SECONDS, or longer where
    the sub-conductors that commit to rank 0 would send it more than CONDUCTOR_BATCHES_PER_S batches at that
    pace."""
    return max(COMMIT_SECONDS, len(roles.commit_children(roles.conductor)) / CONDUCTOR_BATCHES_PER_S)


class SubConductorCore:
    def __init__(self, rank: int, roles: RoleMap, commit_batch: int = COMMIT_BATCH,
                 commit_seconds: float | None = None, steal_rows: int = 0):
        """`commit_seconds`: None for commit_seconds_for(roles)."""
        self.rank, self.roles = rank, roles
        self.conductor = roles.conductor                 # units are asked for here
        self.parent = roles.commit_parent(rank)          # commits and the report go here
        self.children = roles.commit_children(rank)      # sub-conductors that commit through this one
        self.children_left = set(self.children)          # not yet reported
        self.children_busy = set(self.children)          # their last UnitsCommitted not yet seen
        self.relayed: list[UnitsCommitted] = []          # theirs, not yet sent on
        self.relayed_units = 0
        self.send_at = commit_batch * (1 + len(self.children))
        self.tokenizers = roles.tokenizers_under(rank)
        self.commit_batch = commit_batch
        self.commit_seconds = commit_seconds_for(roles) if commit_seconds is None else commit_seconds
        self.block = max(2, len(self.tokenizers))        # units asked for at a time
        self.stock: deque[WorkUnit] = deque()
        self.asking: deque[int] = deque()                # tokenizers whose RequestUnit is not answered yet
        self.asked = self.no_more = self.draining = self.released = self.reported = False
        self.units: dict[int, UnitParts] = {}            # units handed out and not yet complete
        self.complete: list[CommittedUnit] = []          # complete, not yet sent on
        self.complete_since = 0.0                        # when the oldest of them (or of relayed) became complete
        self.tokens = 0                                  # tokens of parts written since the last UnitsCommitted
        self.input_rows = 0                              # input rows of the complete units not yet sent on
        self.tokenizers_left = set(self.tokenizers)
        self.reports: list[RankStats] = []
        self.units_committed = self.batches_sent = 0
        self.stealing = Stealing(steal_rows)
        self.splits: list[list[int]] = []              # [unit, cut] of splits not yet sent on

    @property
    def ready_to_report(self) -> bool:
        """Every tokenizer and every sub-conductor below has reported, and every unit handed out here or relayed
        is committed and sent on (in a drain, the units not complete are abandoned: the next run redoes them)."""
        return (not self.tokenizers_left and not self.complete and not self.reported and not self.children_left
                and not self.relayed and (not self.units or self.draining))

    def start(self) -> list[Send]:
        """The first block, asked for before any tokenizer asks."""
        return self._hand_out()

    def handle(self, source: int, message, now: float) -> list[Send]:
        if isinstance(message, RequestUnit):
            self.asking.append(source)
            return self._hand_out()
        if isinstance(message, UnitGrant):
            self.asked = False
            if not self.draining:
                self.stock.extend(message.units)
                self.no_more = message.last
                if len(message.units) < self.block:     # held back: this node has its share of the units
                    self._share_stock()
            return self._hand_out()
        if isinstance(message, (UnitRead, PartWritten)):
            parts = self.units.get(message.unit)
            if parts is None or self.reported:
                if self.draining:       # a part of a unit abandoned in a drain, after this rank reported
                    return []
                raise RuntimeError(f"sub-conductor rank {self.rank} got {type(message).__name__} for unit "
                                   f"{message.unit}, which it did not hand out")
            if isinstance(message, UnitRead):
                parts.read = message
            else:
                parts.written[source] = message
                self.tokens += message.tokens
            self._complete_if_done(message.unit, now)
            return self.stealing.read(message.unit) if isinstance(message, UnitRead) else []
        if isinstance(message, UnitSplit):
            return self._split(source, message)
        if isinstance(message, UnitsCommitted):         # from a sub-conductor below
            self._hold(now)
            self.relayed.append(message)
            self.relayed_units += len(message.counts) // 3
            if message.last:
                self.children_busy.discard(source)
            return []
        if isinstance(message, RankReports):            # from a sub-conductor below, after its last commit
            self.reports.extend(message.stats)
            self.children_left.discard(source)
            self.children_busy.discard(source)
            return []
        if isinstance(message, RankReport):
            self.reports.append(message.stats)
            if self.stealing.owes(source):         # released once its answer to a SplitUnit is in
                self.stealing.deferred.add(source)
                return []
            self.tokenizers_left.discard(source)
            return [Send(source, Release())]
        if isinstance(message, Drain):
            self.draining = self.no_more = True
            self.stock.clear()
            self.asking.clear()         # the Drain answers them
            self.stealing.stop()
            return [Send(r, Drain()) for r in sorted(self.tokenizers_left | self.children_left)]
        if isinstance(message, Release):
            self.released = True
            return [Send(c, Release()) for c in self.children]
        raise RuntimeError(f"sub-conductor rank {self.rank} got unexpected {type(message).__name__} from rank "
                           f"{source}")

    def poll(self, now: float) -> list[Send]:
        """After each message or a quiet interval: send the complete units (this node's and those relayed) on
        when there are enough, when the oldest has waited long enough, or when no other unit is out here or
        below."""
        if not self.complete and not self.relayed:
            return []
        more_to_come = (self.units and not self.draining) or self.children_busy     # a drain's units never come
        if (len(self.complete) + self.relayed_units < self.send_at and more_to_come
                and now - self.complete_since < self.commit_seconds):
            return []
        counts = array("q", [n for u in self.complete for n in (u.unit, u.rows, u.rejected)])
        own = UnitsCommitted("".join(Ledger.unit_line(u) for u in self.complete).encode(), counts,
                             [r for u in self.complete for r in u.rejects], self.tokens, self.input_rows, self.splits,
                             "".join(Ledger.split_line(u, cut) for u, cut in self.splits).encode())
        batch = merged([*self.relayed, own])
        batch.last = self.no_more and not self.units and not self.children_busy
        self.relayed, self.relayed_units = [], 0
        self.splits, self.input_rows = [], 0
        self.units_committed += len(self.complete)
        self.batches_sent += 1
        self.complete, self.tokens = [], 0
        return [Send(self.parent, batch)]

    def report(self, stats: RankStats) -> list[Send]:
        """The last message (when `ready_to_report`): the tokenizers' reports, those relayed and this rank's own."""
        self.reported = True
        return [Send(self.parent, RankReports(self.reports + [stats]))]

    def _hand_out(self) -> list[Send]:
        out: list[Send] = []
        while self.asking and (self.stock or self.no_more):
            tokenizer = self.asking.popleft()
            if self.stock:
                unit = self.stock.popleft()
                self.stealing.handed(tokenizer, unit)
                out.append(Send(tokenizer, AssignUnit(unit)))
            elif self.stealing.min_rows and not self.draining:
                out += self.stealing.wanting(tokenizer)
            else:
                out.append(Send(tokenizer, NoMoreUnits()))
        # Ask for the next block while a few units are left, so a tokenizer seldom waits for the round trip.
        if not self.asked and not self.no_more and len(self.stock) < max(1, self.block // 2):
            self.asked = True
            out.append(Send(self.conductor, RequestUnits(self.block)))
        for send in out:
            if isinstance(send.message, AssignUnit):
                self.units[send.message.unit.unit] = UnitParts(rows=send.message.unit.rows)
        return out

    def _share_stock(self) -> None:
        """Units are fewer than this node's tokenizer ranks waiting for one (a billion-row job at 1000 nodes gives a
        node about half a unit a rank): cut the stock into a piece for each, in proportion to the units' rows and
        each piece at least `steal_rows` rows, so that none waits for tail stealing's round trips to get work. The
        splits are recorded as tail stealing's are: sent on in the next UnitsCommitted, ahead of any commit."""
        min_rows = self.stealing.min_rows
        if not min_rows or len(self.stock) >= len(self.asking):
            return
        counts = pieces_per_unit([u.rows for u in self.stock], len(self.asking), min_rows)
        stock: deque[WorkUnit] = deque()
        for unit, count in zip(self.stock, counts):
            pieces, start, rows = [], unit.row_start, unit.rows
            for k in range(count - 1, 0, -1):         # from the end, so every split is of the unit's own number
                cut = start + rows * k // count
                unit, piece = split_unit(unit, cut)
                self.splits.append([unit.unit, cut])
                pieces.append(piece)
            stock.extend([unit, *reversed(pieces)])
        self.stock = stock

    def _split(self, source: int, message: UnitSplit) -> list[Send]:
        out, release = self.stealing.answered(source, message, self._add_split, self.draining)
        if release:
            self.tokenizers_left.discard(source)
            out.append(Send(source, Release()))
        return out

    def _add_split(self, unit: int, cut: int, piece: WorkUnit) -> None:
        self.splits.append([unit, cut])
        head = self.units.get(unit)
        if head is not None:
            head.rows -= piece.rows
        self.units[piece.unit] = UnitParts(rows=piece.rows)

    def _complete_if_done(self, unit: int, now: float) -> None:
        parts = self.units[unit]
        if parts.complete:
            self._hold(now)
            self.complete.append(parts.record(unit))
            self.input_rows += parts.rows
            del self.units[unit]

    def _hold(self, now: float) -> None:
        """A unit is about to be held for sending on: the wait starts now if none is held yet."""
        if not self.complete and not self.relayed:
            self.complete_since = now


def merged(batches: list[UnitsCommitted]) -> UnitsCommitted:
    """UnitsCommitted of several sub-conductors as one, each one's splits still ahead of every commit."""
    if len(batches) == 1:
        return batches[0]
    counts = array("q")
    for batch in batches:
        counts.extend(batch.counts)
    return UnitsCommitted(b"".join(b.records for b in batches), counts, [r for b in batches for r in b.rejects],
                          sum(b.tokens for b in batches), sum(b.input_rows for b in batches),
                          [s for b in batches for s in b.splits], b"".join(b.split_lines for b in batches))


def pieces_per_unit(rows: list[int], pieces: int, min_rows: int) -> list[int]:
    """How many pieces to cut each unit of `rows` into: about `pieces` in all, in proportion to their rows (by
    largest remainder), each piece at least `min_rows` rows and each unit at least one piece."""
    total = sum(rows)
    exact = [r * pieces / total for r in rows]
    most = [max(1, r // min_rows) for r in rows]
    counts = [max(1, min(int(e), m)) for e, m in zip(exact, most)]
    for k in sorted(range(len(rows)), key=lambda k: counts[k] - exact[k]):
        if sum(counts) >= pieces:
            break
        if counts[k] < most[k]:
            counts[k] += 1
    return counts
