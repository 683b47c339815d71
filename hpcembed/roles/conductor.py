"""Conductor role (rank 0): hands out work units on request, tracks when each unit is fully written, shows
progress, and finishes the job with the manifest and _SUCCESS. It only ever sees small control messages.

A unit is committed when its tokenizer has reported how many rows it sent to each gpu rank (UnitRead) and each
of those gpu ranks has reported a written shard with that many rows (PartWritten).

A committed unit is recorded in the ledger (io/ledger.py) with its shards and rejects; a resumed job starts
from the ledger's committed units and hands out only the rest.

Ids repeated across tokenizer ranks (or across runs of a resumed job) are reported after reading
(DuplicateRows). They fail the job, or under --on-invalid skip the later rows are dropped from their committed
shards (DropIds) and recorded as rejects before the job may finish.

Graceful stop (a signal, see signals.py): no more units are handed out, tokenizers are told to abandon the unit
they are reading (Drain), and the job ends once what is in flight is committed, with the partial units
discarded: the next run redoes them.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import HpcEmbedError, InputError
from ..io.ids import id_digest
from ..io.ledger import CommittedUnit, Ledger, LedgerState
from ..io.sources import Plan
from ..io.writer import OutputDir
from ..progress import Progress
from ..signals import STOP, StopRequest
from ..transport.base import Transport
from .common import RoleMap
from .messages import (AssignUnit, Drain, DropIds, DuplicateRows, Failure, NoMoreUnits, PartRewritten, PartWritten,
                       RankReport, Release, RequestUnit, Stop, StopRequested, UnitRead)

log = logging.getLogger("hpcembed")


class JobFailed(HpcEmbedError):
    def __init__(self, failure: Failure, name_rank: bool):
        self.failure = failure
        self.exit_code = failure.exit_code
        where = f" [rank {failure.rank}, {failure.role}]" if name_rank else ""
        super().__init__(failure.message + where)


@dataclass
class _UnitState:
    read: UnitRead | None = None
    written: dict[int, PartWritten] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.read is not None and all(
            gpu in self.written and self.written[gpu].rows == rows for gpu, rows in self.read.sent.items())


@dataclass
class JobResult:
    rows_written: int               # in the output now, resumed rows included
    tokens: int                     # embedded by this run
    rejected_rows: int              # resumed rejects included
    rows_resumed: int               # committed by earlier runs of this job
    units_resumed: int
    stopped_early: str              # the signal that stopped the job, or ""
    shards: list[dict]
    reports: dict[int, RankReport]
    wall_seconds: float
    ended_at: float                 # epoch seconds


class Conductor:
    def __init__(self, transport: Transport, roles: RoleMap, plan: Plan, output: OutputDir, progress: Progress,
                 ledger: Ledger, resumed: LedgerState, name_ranks: bool = False, skip_invalid: bool = False,
                 stop: StopRequest = STOP):
        self.t, self.roles, self.plan, self.output, self.progress = transport, roles, plan, output, progress
        self.ledger, self.stop = ledger, stop
        self.done: dict[int, CommittedUnit] = dict(resumed.units)
        self.rows_resumed, self.units_resumed = resumed.rows, len(resumed.units)
        self.rejected_resumed = resumed.rejected
        self.pending = deque(u for u in plan.units if u.unit not in self.done)
        self.units = {u.unit: _UnitState() for u in self.pending}
        self.plan_units = {u.unit: u for u in plan.units}
        self.tokens = 0
        self.reports: dict[int, RankReport] = {}
        self.name_ranks, self.skip_invalid = name_ranks, skip_invalid
        self.paths = {f.index: f.path for f in plan.files}
        # unit -> {digest: its reject}: ids to drop once the unit is committed, then while gpus drop them
        self.drops: dict[int, dict[bytes, InputError]] = {}
        self.dropping: dict[int, dict[bytes, InputError]] = {}
        self.rewrites_pending = 0
        self.draining = False
        self._next_gpu = 0

    @property
    def rows_written(self) -> int:
        return sum(u.rows for u in self.done.values())

    @property
    def rejected_rows(self) -> int:
        return sum(u.rejected for u in self.done.values())

    def run(self) -> JobResult:
        start = time.monotonic()
        tokenizers_left = set(self.roles.tokenizers)
        stop_sent = False
        try:
            while True:
                env = self.t.recv(timeout=0.5)
                self.progress.tick()
                if env is not None:
                    self._handle(env.source, env.message)
                    tokenizers_left -= set(self.reports)
                if self.stop.requested and not self.draining:
                    self._drain(tokenizers_left)
                all_done = len(self.done) == len(self.plan.units)
                if self.draining:
                    self.drops.clear()          # their units are uncommitted: the next run redoes them
                settled = not self.drops and not self.rewrites_pending
                if (all_done or self.draining) and not tokenizers_left and not stop_sent and settled:
                    for gpu in self.roles.gpus:
                        self.t.send(gpu, Stop(drain=self.draining))
                    stop_sent = True
                if stop_sent and all(g in self.reports for g in self.roles.gpus):
                    break
        finally:
            self.ledger.close()
            self.progress.close()
        stopped = self.stop.signal_name if self.draining and len(self.done) < len(self.plan.units) else ""
        shards = [{"path": name, "rows": rows} for u in self.done.values() for name, rows in u.shards.items()]
        return JobResult(self.rows_written, self.tokens, self.rejected_rows, self.rows_resumed, self.units_resumed,
                         stopped, shards, self.reports, time.monotonic() - start, time.time())

    def _drain(self, tokenizers_left: set[int]) -> None:
        self.draining = True
        log.info("stopping: %d of %d units committed; abandoning the units being read", len(self.done),
                 len(self.plan.units))
        self.pending.clear()
        for tokenizer in tokenizers_left:
            self.t.send(tokenizer, Drain())

    def _handle(self, source: int, message) -> None:
        if isinstance(message, RequestUnit):
            self.t.send(source, AssignUnit(self.pending.popleft()) if self.pending else NoMoreUnits())
        elif isinstance(message, UnitRead):
            self.units[message.unit].read = message
            self._commit_if_done(message.unit)
        elif isinstance(message, PartWritten):
            self.units[message.unit].written[source] = message
            self.tokens += message.tokens
            self.progress.update(message.rows, message.tokens)
            self._commit_if_done(message.unit)
        elif isinstance(message, DuplicateRows):
            self._duplicates(message)
        elif isinstance(message, PartRewritten):
            self._rewritten(message)
        elif isinstance(message, StopRequested):
            self.stop.request(message.why)
        elif isinstance(message, RankReport):
            self.reports[source] = message
            if message.role == "tokenizer":
                self.t.send(source, Release())
        elif isinstance(message, Failure):
            raise JobFailed(message, self.name_ranks)
        else:
            raise RuntimeError(f"conductor got unexpected {type(message).__name__} from rank {source}")

    def _commit_if_done(self, unit: int) -> None:
        state = self.units.get(unit)
        if state is not None and unit not in self.done and state.complete:
            read = state.read
            committed = CommittedUnit(unit, {p.shard: p.rows for p in state.written.values()},
                                      sum(p.tokens for p in state.written.values()), read.rejected_rows,
                                      read.rejects)
            # Ledger first: a reject line without its ledger record is rebuilt away on resume.
            self.ledger.commit_unit(committed)
            self.output.append_rejects(read.rejects)
            self.done[unit] = committed
            del self.units[unit]
        if unit in self.done and unit in self.drops:
            errors = self.drops.pop(unit)
            self.dropping.setdefault(unit, {}).update(errors)
            for shard in self.done[unit].shards:
                self.t.send(self.roles.gpus[self._next_gpu % len(self.roles.gpus)], DropIds(unit, shard, list(errors)))
                self._next_gpu += 1
                self.rewrites_pending += 1

    def _where(self, unit: int, file: int, row: int) -> tuple[str, str]:
        """(path, description) of a row; file -1 is a row an earlier run committed (its input row is unknown)."""
        if file >= 0:
            return self.paths[file], f"{self.paths[file]} at row {row}"
        source = self.plan_units[unit]
        return source.file.path, (f"the output of an earlier run (unit {unit}: {source.file.path} rows "
                                  f"{source.row_start}-{source.row_stop - 1})")

    def _duplicates(self, message: DuplicateRows) -> None:
        for unit, file, row, first_unit, first_file, first_row, digest in message.rows:
            path, _ = self._where(unit, file, row)
            _, first = self._where(first_unit, first_file, first_row)
            error = InputError(path, f"duplicate id, first seen in {first}", row if file >= 0 else None)
            if not self.skip_invalid:
                raise error
            # Recorded as a reject once the gpu rank has removed it, when the id itself is known again.
            self.drops.setdefault(unit, {})[digest] = error
        for unit in {r[0] for r in message.rows}:
            self._commit_if_done(unit)

    def _rewritten(self, message: PartRewritten) -> None:
        self.rewrites_pending -= 1
        unit = self.done[message.unit]
        unit.shards[message.shard] -= len(message.removed_ids)
        unit.rejected += len(message.removed_ids)
        errors = self.dropping[message.unit]
        records = []
        for row_id in message.removed_ids:
            error = errors[id_digest(row_id)]
            error.row_id = row_id
            records.append(error.as_reject())
        unit.rejects.extend(records)
        self.ledger.record_drop(message.unit, message.shard, len(message.removed_ids), records)
        self.output.append_rejects(records)
