"""The conductor's protocol core (rank 0): hands out work units on request, commits each unit once every part of
it is written, and decides when the job stops. It sends nothing itself: `handle` and `poll` return the messages
to send, and a driver (roles/conductor.py in real time, scaling/sim.py in virtual time) delivers them.

The commit rule: a unit is committed when its tokenizer has reported how many rows it sent to each encoder rank
(UnitRead) and each of those ranks has reported a written shard with that many rows (PartWritten). A committed
unit goes to the ledger (io/ledger.py) with its shards and rejects, ledger first, then the rejects file; a resumed
job starts from the ledger's committed units and hands out only the rest.

Ids repeated across tokenizer ranks (or across runs of a resumed job) are reported after reading
(DuplicateRows). They fail the job, or under --on-invalid skip the later rows are dropped from their committed
shards (DropIds) and recorded as rejects before the job may finish.

Sub-conductors (protocol/subconductor.py, for jobs of hundreds of nodes) take the per-unit messages off rank 0:
each asks for units in blocks (RequestUnits, answered with as many as it asked for up to its node's share of the
job by tokenizer ranks, so that no node sits on units another lacks), applies the commit rule to its own
tokenizers' units, and sends the complete ones here in batches (UnitsCommitted). This core writes them to the
ledger, one write per batch: the ledger and the rejects file stay rank 0's alone, so resume is unchanged.

Tail stealing (protocol/stealing.py): once no unit is left to hand out, a tokenizer rank that asks for one gets a
piece of a unit another rank is reading, split off for it; the split is in the ledger before the piece is out.

Graceful stop (a signal, or a StopRequested from a rank that got one): no more units are handed out, tokenizers
are told to abandon the unit they are reading (Drain), and the job ends once what is in flight is committed, with
the partial units discarded: the next run redoes them.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from ..errors import HpcEmbedError, InputError
from ..io.committed import CommittedUnits, RecordedUnit
from ..io.ids import id_digest
from ..io.ledger import CommittedUnit, Ledger, LedgerState
from ..io.sources import Plan
from ..io.writer import OutputDir
from ..manifest import JobResult, RankStats
from ..topology import RoleMap
from .messages import (AssignUnit, Calibrated, Drain, DropIds, DuplicateRows, Failure, NoMoreUnits, PartRewritten,
                       PartWritten, RankReport, RankReports, Release, RequestUnit, RequestUnits, Send, Stop,
                       StopRequested, UnitGrant, UnitRead, UnitsCommitted, UnitSplit)
from .stealing import Stealing

log = logging.getLogger("hpcembed")


class JobFailed(HpcEmbedError):
    def __init__(self, failure: Failure, name_rank: bool):
        self.failure = failure
        self.exit_code = failure.exit_code
        where = f" [rank {failure.rank}, {failure.role}]" if name_rank else ""
        super().__init__(failure.message + where)


@dataclass
class UnitParts:
    """What the conductor knows of a unit not yet committed."""
    read: UnitRead | None = None
    written: dict[int, PartWritten] = field(default_factory=dict)
    rows: int = 0               # input rows, where a sub-conductor hands the unit out (its UnitsCommitted's)

    @property
    def complete(self) -> bool:
        return self.read is not None and all(
            rank in self.written and self.written[rank].rows == rows for rank, rows in self.read.sent.items())

    def record(self, unit: int) -> CommittedUnit:
        """The ledger record of the complete unit."""
        written = self.written.values()
        return CommittedUnit(unit, {p.shard: p.shard_rows for p in written}, sum(p.tokens for p in written),
                             self.read.rejected_rows, self.read.rejects,
                             {p.shard: [p.size, p.digest, *p.companion] for p in written if p.size >= 0})


def shares(units: int, weights: dict[int, int]) -> dict[int, int]:
    """`units` apportioned in proportion to `weights` (largest remainder): whole numbers that add up to `units`."""
    total = sum(weights.values())
    if not total:
        return dict.fromkeys(weights, 0)
    exact = {k: units * w / total for k, w in weights.items()}
    out = {k: int(e) for k, e in exact.items()}
    for k in sorted(exact, key=lambda k: out[k] - exact[k])[:units - sum(out.values())]:
        out[k] += 1
    return out


class ConductorCore:
    def __init__(self, roles: RoleMap, plan: Plan, output: OutputDir, ledger: Ledger, resumed: LedgerState,
                 skip_invalid: bool = False, name_ranks: bool = False, progress=None, ranges_due: bool = False,
                 steal_rows: int = 0):
        """`progress`: anything with update(rows, tokens), told of each written part's tokens and each committed
        unit's rows; `name_ranks`: failures name the rank they came from (an MPI job; one process has no ranks to
        name); `ranges_due`: int8/uint8 output whose ranges the encoder ranks will send (Calibrated). A
        sub-conductor's commits, which take another path than the encoder ranks' Calibrated, wait for them.
        `steal_rows`: tail stealing's least rows per half of a split (0: none). `plan` already has the splits of
        the resumed units applied (Plan.split); the ones made now are added to it."""
        self.roles, self.plan, self.output, self.ledger, self.progress = roles, plan, output, ledger, progress
        self.skip_invalid, self.name_ranks = skip_invalid, name_ranks
        self.done = CommittedUnits(resumed.units)
        self.pending = deque(u for u in plan.units if u.unit not in self.done)
        self.units: dict[int, UnitParts] = {}        # units read or written in part, not yet committed
        self.plan_units = {u.unit: u for u in plan.units}
        # Sub-conductors' splits, in the ledger but not yet in the plan: applied when something asks for the
        # plan's units (a split's two WorkUnits and four dict entries were two thirds of rank 0's time in a
        # billion-row job at 1000 nodes; bench/notes/scale_out.md).
        self._unapplied: list = []
        self.rows_resumed, self.units_resumed = self._texts(resumed.units), len(resumed.units)
        self.ranges = resumed.ranges        # int8/uint8 output's calibration ranges, once known
        self.paths = {f.index: f.path for f in plan.files}
        self.tokens = 0
        self.reports: dict[int, RankStats] = {}
        self.tokenizers_left = set(roles.reporters())      # tokenizers and sub-conductors yet to report
        self.subconductors = len(roles.subconductors)
        # Each sub-conductor's share of the units, by the tokenizer ranks it serves (_grant).
        self.owed = shares(len(self.pending), {s: len(roles.tokenizers_under(s)) for s in roles.subconductors})
        self.ranges_due = ranges_due and self.ranges is None
        self.held: list[UnitsCommitted] = []                 # commits waiting for the ranges
        # unit -> {digest: its reject}: ids to drop once the unit is committed, then while encoders drop them
        self.drops: dict[int, dict[bytes, InputError]] = {}
        self.dropping: dict[int, dict[bytes, InputError]] = {}
        self.rewrites_pending = 0
        self.stop_reason = ""           # a signal's name: set by poll() or a StopRequested
        self.draining = self.stop_sent = False
        self._next_encoder = 0
        self.stealing = Stealing(steal_rows)

    # --- state the drivers read -------------------------------------------------------------------------------
    @property
    def all_committed(self) -> bool:
        return len(self.done) == len(self.plan.units) + len(self._unapplied)

    def settled_plan(self) -> Plan:
        """The plan with every split made so far applied."""
        for unit, cut in self._unapplied:
            self._plan_split(unit, cut)
        self._unapplied.clear()
        return self.plan

    @property
    def finished(self) -> bool:
        """Every encoder rank has reported after its Stop: the job is over."""
        return self.stop_sent and all(e in self.reports for e in self.roles.encoders)

    def _texts(self, units: dict[int, CommittedUnit]) -> int:
        """Input rows of committed units that are in the output: every row of a unit is there or rejected."""
        self.settled_plan()
        return sum(self.plan_units[n].rows - u.rejected for n, u in units.items())

    @property
    def rows_written(self) -> int:
        """Input rows in the output (a chunked text's windows count once)."""
        return self._texts(self.done)

    @property
    def output_rows(self) -> int:
        """Rows the committed shards hold."""
        return sum(u.rows for u in self.done.values())

    @property
    def rejected_rows(self) -> int:
        return sum(u.rejected for u in self.done.values())

    def result(self, wall_seconds: float, ended_at: float) -> JobResult:
        self.settled_plan()             # the manifest counts the splits
        stopped = self.stop_reason if self.draining and not self.all_committed else ""
        shards = [{"path": name, "rows": rows} for unit in self.done.whole_records()
                  for name, rows in unit.shards.items()]
        return JobResult(self.rows_written, self.tokens, self.rejected_rows, self.rows_resumed, self.units_resumed,
                         stopped, shards, self.reports, wall_seconds, ended_at, self.output_rows, self.ranges)

    # --- entry points -----------------------------------------------------------------------------------------
    def handle(self, source: int, message) -> list[Send]:
        if isinstance(message, RequestUnit):
            if self.pending:
                unit = self.pending.popleft()
                self.stealing.handed(source, unit)
                return [Send(source, AssignUnit(unit))]
            if self.stealing.min_rows and not self.draining:
                return self.stealing.wanting(source)
            return [Send(source, NoMoreUnits())]
        if isinstance(message, UnitSplit):
            return self._split(source, message)
        if isinstance(message, RequestUnits):
            return [Send(source, self._grant(source, message.count))]
        if isinstance(message, UnitsCommitted):
            if self.ranges_due and self.ranges is None:
                self.held.append(message)
                return []
            return self._committed(message)
        if isinstance(message, UnitRead):
            self.units.setdefault(message.unit, UnitParts()).read = message
            return self._commit_if_done(message.unit) + self.stealing.read(message.unit)
        if isinstance(message, PartWritten):
            self.units.setdefault(message.unit, UnitParts()).written[source] = message
            self.tokens += message.tokens
            if self.progress is not None:
                self.progress.update(0, message.tokens)
            return self._commit_if_done(message.unit)
        if isinstance(message, Calibrated):
            # Every encoder rank sends the same ranges; the first is recorded before any shard is committed.
            if self.ranges is None:
                self.ranges = message.ranges
                self.ledger.record_calibration(message.ranges)
            held, self.held = self.held, []
            return [send for batch in held for send in self._committed(batch)]
        if isinstance(message, DuplicateRows):
            return self._duplicates(message)
        if isinstance(message, PartRewritten):
            self._rewritten(message)
            return []
        if isinstance(message, StopRequested):
            self.stop_reason = self.stop_reason or message.why
            return []
        if isinstance(message, RankReport):
            self.reports[source] = message.stats
            if self.stealing.owes(source):         # released once its answer to a SplitUnit is in
                self.stealing.deferred.add(source)
                return []
            self.tokenizers_left.discard(source)
            return [Send(source, Release())] if self.roles.role_of(source) == "tokenizer" else []
        if isinstance(message, RankReports):
            self.reports.update({stats.rank: stats for stats in message.stats})
            self.tokenizers_left.discard(source)
            return [Send(source, Release())]
        if isinstance(message, Failure):
            raise JobFailed(message, self.name_ranks)
        raise RuntimeError(f"conductor got unexpected {type(message).__name__} from rank {source}")

    def poll(self, signal_name: str = "") -> list[Send]:
        """After each message (or a quiet interval): start a drain when a stop was asked for (`signal_name`: one
        this process received), and stop the encoder ranks once nothing is left to wait for."""
        self.stop_reason = self.stop_reason or signal_name
        out: list[Send] = []
        if self.stop_reason and not self.draining:
            self.draining = True
            log.info("stopping: %d of %d units committed; abandoning the units being read", len(self.done),
                     len(self.plan.units) + len(self._unapplied))
            self.pending.clear()
            self.stealing.stop()
            out += [Send(t, Drain()) for t in sorted(self.tokenizers_left)]
        if self.draining:
            self.drops.clear()          # their units are uncommitted: the next run redoes them
            self.held.clear()
        settled = not self.drops and not self.rewrites_pending and not self.held
        if (self.all_committed or self.draining) and not self.tokenizers_left and not self.stop_sent and settled:
            out += [Send(e, Stop(drain=self.draining)) for e in self.roles.encoders]
            self.stop_sent = True
        return out

    # --- tail stealing ---------------------------------------------------------------------------------------
    def _split(self, source: int, message: UnitSplit) -> list[Send]:
        out, release = self.stealing.answered(source, message, lambda unit, cut, _: self._add_split(unit, cut),
                                              self.draining)
        if release:
            self.tokenizers_left.discard(source)
            out.append(Send(source, Release()))
        return out

    def _add_split(self, unit: int, cut: int) -> None:
        self.settled_plan()             # in order: a split of this unit may be waiting
        self.ledger.record_split(unit, cut)
        self._plan_split(unit, cut)

    def _plan_split(self, unit: int, cut: int) -> None:
        head, piece = self.plan.split(unit, cut)
        self.plan_units[unit], self.plan_units[piece.unit] = head, piece

    # --- grants and batched commits from sub-conductors ---------------------------------------------------------
    def _grant(self, source: int, count: int) -> UnitGrant:
        """Up to `count` units, but no more than the sub-conductor's node is still owed of an even share (by
        tokenizer ranks) of the units there were to grant. Where units are few for the tokenizer ranks (a
        billion-row job at 1000 nodes: about half a unit a rank), every node gets its share whatever order the
        requests come in, instead of the first nodes to ask taking most (nodes then finished 24% apart, and ranks
        steal only within their node). A node past its share gets one unit a request while any are left, so a
        faster node still takes more of a long job's units."""
        owed = self.owed.get(source, 0)
        units = [self.pending.popleft() for _ in range(min(count, max(1, owed), len(self.pending)))]
        self.owed[source] = owed - len(units)
        return UnitGrant(units, last=not self.pending)

    def committed(self, unit: int) -> CommittedUnit:
        """A committed unit's whole record (a sub-conductor's is parsed from its ledger line the first time)."""
        record = self.done[unit]
        if isinstance(record, RecordedUnit):
            record = self.done[unit] = record.parse()
        return record

    def _committed(self, message: UnitsCommitted) -> list[Send]:
        self._unapplied.extend(message.splits)
        # Ledger first: a reject line without its ledger record is rebuilt away on resume. The splits go first, in
        # the same write.
        split_lines = message.split_lines or "".join(Ledger.split_line(unit, cut) for unit, cut in message.splits)
        self.ledger.append_lines([split_lines, message.records])
        self.output.append_rejects(message.rejects)
        counts = message.counts
        self.done.add_batch(message)
        rows = message.input_rows - sum(counts[2::3])
        self.tokens += message.tokens
        if self.progress is not None:
            self.progress.update(rows, message.tokens)
        if not self.drops:
            return []
        return [send for k in range(0, len(counts), 3) for send in self._drops(counts[k])]

    def _record(self, committed: list[CommittedUnit]) -> None:
        self.settled_plan()
        # Ledger first: a reject line without its ledger record is rebuilt away on resume.
        self.ledger.commit_units(committed)
        for unit in committed:
            self.output.append_rejects(unit.rejects)
            self.done[unit.unit] = unit
            self.units.pop(unit.unit, None)
            if self.progress is not None:       # input rows, counted once their unit is committed
                self.progress.update(self.plan_units[unit.unit].rows - unit.rejected, 0)

    # --- the commit rule --------------------------------------------------------------------------------------
    def _commit_if_done(self, unit: int) -> list[Send]:
        parts = self.units.get(unit)
        if parts is not None and unit not in self.done and parts.complete:
            self._record([parts.record(unit)])
        return self._drops(unit)

    def _drops(self, unit: int) -> list[Send]:
        """DropIds for a committed unit that holds ids found repeated after it was read."""
        out: list[Send] = []
        if unit in self.done and unit in self.drops:
            errors = self.drops.pop(unit)
            self.dropping.setdefault(unit, {}).update(errors)
            encoders = self.roles.encoders
            for shard in self.committed(unit).shards:
                out.append(Send(encoders[self._next_encoder % len(encoders)], DropIds(unit, shard, list(errors))))
                self._next_encoder += 1
                self.rewrites_pending += 1
        return out

    def _where(self, unit: int, file: int, row: int) -> tuple[str, str]:
        """(path, description) of a row; file -1 is a row an earlier run committed (its input row is unknown)."""
        if file >= 0:
            return self.paths[file], f"{self.paths[file]} at row {row}"
        self.settled_plan()
        source = self.plan_units[unit]
        return source.file.path, (f"the output of an earlier run (unit {unit}: {source.file.path} rows "
                                  f"{source.row_start}-{source.row_stop - 1})")

    def _duplicates(self, message: DuplicateRows) -> list[Send]:
        for unit, file, row, first_unit, first_file, first_row, digest in message.rows:
            path, _ = self._where(unit, file, row)
            _, first = self._where(first_unit, first_file, first_row)
            error = InputError(path, f"duplicate id, first seen in {first}", row if file >= 0 else None)
            if not self.skip_invalid:
                raise error
            # Recorded as a reject once the encoder rank has removed it, when the id itself is known again.
            self.drops.setdefault(unit, {})[digest] = error
        return [send for unit in sorted({r[0] for r in message.rows}) for send in self._commit_if_done(unit)]

    def _rewritten(self, message: PartRewritten) -> None:
        self.rewrites_pending -= 1
        unit = self.committed(message.unit)
        rows = message.rows if message.rows >= 0 else unit.shards[message.shard] - len(message.removed_ids)
        unit.shards[message.shard] = rows
        unit.rejected += len(message.removed_ids)
        errors = self.dropping[message.unit]
        records = []
        for row_id in message.removed_ids:
            error = errors[id_digest(row_id)]
            error.row_id = row_id
            records.append(error.as_reject())
        unit.rejects.extend(records)
        file = [message.size, message.digest, *message.companion] if message.size >= 0 else None
        if file is not None:
            unit.files[message.shard] = file
        self.ledger.record_drop(message.unit, message.shard, len(message.removed_ids), records, file, rows)
        self.output.append_rejects(records)
