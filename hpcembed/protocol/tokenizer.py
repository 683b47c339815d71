"""The tokenizer's protocol core: which unit to read next, which encoder rank gets each batch, what to report when
a unit is read, and when the rank may leave. It reads and tokenizes nothing and sends nothing: the driver
(roles/tokenizer.py in real time, scaling/sim.py in virtual time) does the work and sends what the core returns.

The credit rule, this side: an encoder rank grants credits; one credit lets one batch be in flight to it, so memory
stays bounded whatever the speed difference. Each encoder rank sends one initial grant and then one Credit per
batch it took, so this rank knows exactly how many Credit messages it is owed, and leaves only when all came (an
MPI message still unreceived at MPI_Finalize kills the whole world under MPICH).

Tail stealing (protocol/stealing.py), this side: asked to split a unit (SplitUnit), the rank cuts what it has not
read yet in two at a row boundary past the rows in hand (`position`, which the driver moves on as it reads), keeps
the first half and answers with the rest as a piece (UnitSplit); a unit not yet begun is cut in the middle. It
refuses when a half would have fewer than `steal_rows` rows, or when the unit is already read.

Routing: each batch goes to the linked encoder rank with the most free credit, staying with the previous one on
ties so that a unit's rows land in few shards. Until every linked encoder rank's first grant has come, a batch
waits up to GRANT_PATIENCE_S from the first grant for the others: a rank that read ahead while the encoder ranks
loaded would otherwise send its first batch wherever the first grant came from, and so would every other rank
linked there (the simulation's disaggregated shape: a CPU node's 136 tokenizer ranks sent their first batches to
the same encoder rank of each GPU node, which got three times its share of a short job).

Read-ahead: until the first grant comes (the encoder ranks are still building their models), the driver keeps the
batches it has made, up to READ_AHEAD_BATCHES, and tokenizes on (`holds`); they go first once a grant has come,
and all of a unit's before its UnitEnd. In a short job at scale the tokenizer ranks' time is otherwise on the
critical path after the model load (the simulation's billion-row job at 100 nodes: 90.7% -> 93.9% whole-job).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..io.sources import WorkUnit, split_unit
from ..topology import RoleMap
from .messages import (AssignUnit, Credit, Drain, NoMoreUnits, RankReport, Release, RequestUnit, Send, SplitUnit,
                       UnitEnd, UnitRead, UnitSplit)

GRANT_PATIENCE_S = 0.05
READ_AHEAD_BATCHES = 8


@dataclass
class UnitProgress:
    """One unit as this rank reads it."""
    sent: dict[int, int] = field(default_factory=dict)     # encoder rank (or this rank, writing tokens) -> rows
    tokens: int = 0
    rejects: list[dict] = field(default_factory=list)
    rejected: int = 0
    previous: int | None = None                            # the encoder rank the last batch went to


class TokenizerCore:
    def __init__(self, rank: int, roles: RoleMap, steal_rows: int = 0, read_ahead: int = READ_AHEAD_BATCHES):
        """`read_ahead`: batches kept before the first grant (0: none, as before session 20; the simulation's
        replays of runs measured then)."""
        self.rank, self.roles, self.steal_rows, self.read_ahead = rank, roles, steal_rows, read_ahead
        self.conductor = roles.conductor_of(rank)           # the conductor, or this host's sub-conductor
        self.encoders = roles.encoders_of(rank)
        self.credits = {e: 0 for e in self.encoders}
        self.credit_messages = {e: 0 for e in self.encoders}
        self.batches_sent = {e: 0 for e in self.encoders}
        self.assigned: deque[WorkUnit] = deque()
        self.no_more = self.draining = self.released = False
        self.rows = self.tokens = 0
        self.reading: WorkUnit | None = None    # the unit being read: its row_stop moves up if it is split
        self.position = 0                       # the first row of it not yet in hand
        self._ungranted = len(self.encoders)    # linked encoder ranks whose first grant has not come
        self._first_grant_seen: float | None = None

    # --- state the driver reads -------------------------------------------------------------------------------
    @property
    def waiting_for_unit(self) -> bool:
        """Nothing assigned yet, and more may come: the driver waits for a message."""
        return not self.assigned and not self.no_more

    @property
    def credits_settled(self) -> bool:
        """Every Credit message owed has come: the initial grant, then one per batch sent."""
        return all(self.credit_messages[e] >= 1 + self.batches_sent[e] for e in self.encoders)

    # --- entry points -----------------------------------------------------------------------------------------
    def start(self) -> list[Send]:
        return [Send(self.conductor, RequestUnit())]

    def handle(self, source: int, message) -> list[Send]:
        if isinstance(message, Credit):
            self.credits[source] += message.count
            self.credit_messages[source] += 1
            if self.credit_messages[source] == 1:
                self._ungranted -= 1
        elif isinstance(message, AssignUnit):
            self.assigned.append(message.unit)
        elif isinstance(message, NoMoreUnits):
            self.no_more = True
        elif isinstance(message, Drain):
            self.draining = self.no_more = True
            self.assigned.clear()
        elif isinstance(message, Release):
            self.released = True
        elif isinstance(message, SplitUnit):
            return [Send(source, self._split(message.unit))]
        else:
            raise RuntimeError(f"tokenizer rank {self.rank} got unexpected {type(message).__name__}")
        return []

    def next_unit(self) -> tuple[WorkUnit | None, list[Send]]:
        """The unit to read now (None: no more work), and a request for the one after it, so that it is here
        when this one is done (hides the round trip)."""
        if not self.assigned:
            return None, []
        self.reading = self.assigned.popleft()
        self.position = self.reading.row_start
        return self.reading, [Send(self.conductor, RequestUnit())]

    def _split(self, number: int) -> UnitSplit:
        if self.draining:
            return UnitSplit(number)
        if self.reading is not None and self.reading.unit == number:
            left = self.reading.row_stop - self.position
            if self.steal_rows <= 0 or left < 2 * self.steal_rows:
                return UnitSplit(number)
            self.reading, piece = split_unit(self.reading, self.position + left // 2)
            return UnitSplit(number, piece.row_start, piece)
        for k, unit in enumerate(self.assigned):
            if unit.unit == number:
                if self.steal_rows <= 0 or unit.rows < 2 * self.steal_rows:
                    break
                self.assigned[k], piece = split_unit(unit, unit.row_start + unit.rows // 2)
                return UnitSplit(number, piece.row_start, piece)
        return UnitSplit(number)

    def holds(self, held: int) -> bool:
        """Whether a batch ready now is kept back and the rank tokenizes on (`held`: batches it keeps already):
        while no linked encoder rank has granted credit yet (they are still building their models), up to
        `read_ahead` (READ_AHEAD_BATCHES)."""
        return bool(self.encoders) and self._ungranted == len(self.encoders) and held < self.read_ahead

    def grant_wait(self, now: float) -> float | None:
        """How much longer, at `now` (seconds, the driver's clock), a batch holds out for the first grants of the
        linked encoder ranks not heard from yet; None when it does not (all came, or the patience is spent)."""
        if not self._ungranted or self._first_grant_seen is None:
            return None
        left = self._first_grant_seen + GRANT_PATIENCE_S - now
        return left if left > 0 else None

    def route(self, progress: UnitProgress, owner: int | None = None, now: float | None = None) -> int | None:
        """The encoder rank for the next batch of this unit; None while no linked rank has free credit, or, given
        `now`, while it holds out for the first grants (grant_wait). `owner`: the batch's rows belong to that
        rank (--dedup), which takes it once it has credit."""
        if owner is not None:
            return owner if self.credits[owner] > 0 else None
        if not self.credits:
            return None
        best = max(self.credits, key=self.credits.__getitem__)
        if self.credits[best] <= 0:
            return None
        if now is not None and self._ungranted:
            if self._first_grant_seen is None:
                self._first_grant_seen = now
            if self.grant_wait(now) is not None:
                return None
        previous = progress.previous
        if previous is not None and self.credits.get(previous, 0) >= self.credits[best]:
            return previous
        return best

    def sent(self, dest: int, rows: int, tokens: int, progress: UnitProgress) -> None:
        """A batch of `rows` went to `dest` (an encoder rank, or this rank's own token shard)."""
        if dest in self.credits:
            self.credits[dest] -= 1
            self.batches_sent[dest] += 1
        progress.previous = dest
        progress.sent[dest] = progress.sent.get(dest, 0) + rows
        progress.tokens += tokens
        self.rows += rows

    def referenced(self, dest: int, rows: int, progress: UnitProgress) -> None:
        """`rows` went to `dest` as references (--dedup): no tokens, no credit, but rows of the unit there."""
        progress.sent[dest] = progress.sent.get(dest, 0) + rows
        self.rows += rows

    def unit_read(self, unit: WorkUnit, progress: UnitProgress) -> list[Send]:
        """Every row of the unit is sent (or rejected): tell each encoder rank how many rows it got, and the
        conductor where they all went. `unit`: as it was read (a split shortened it: `reading`)."""
        self.reading = None
        self.tokens += progress.tokens
        ends = [Send(e, UnitEnd(unit.unit, rows)) for e, rows in progress.sent.items() if e in self.credits]
        return ends + [Send(self.conductor, UnitRead(unit.unit, progress.sent, progress.tokens,
                                                           progress.rejects, progress.rejected))]

    def report(self, stats) -> list[Send]:
        """The rank's last report; it then waits for the conductor's Release (`released`)."""
        stats.batches_sent = {str(e): n for e, n in self.batches_sent.items()}
        return [Send(self.conductor, RankReport(stats))]
