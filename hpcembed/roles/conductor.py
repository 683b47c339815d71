"""Conductor role (rank 0): hands out work units on request, tracks when each unit is fully written, shows
progress, and finishes the job with the manifest and _SUCCESS. It only ever sees small control messages.

A unit is committed when its tokenizer has reported how many rows it sent to each gpu rank (UnitRead) and each
of those gpu ranks has reported a written shard with that many rows (PartWritten).

Ids repeated across tokenizer ranks are reported after reading (DuplicateRows). They fail the job, or under
--on-invalid skip the later rows are dropped from their committed shards (DropIds) and recorded as rejects
before the job may finish.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import HpcEmbedError, InputError
from ..io.ids import id_digest
from ..io.sources import Plan
from ..io.writer import OutputDir
from ..progress import Progress
from ..transport.base import Transport
from .common import RoleMap
from .messages import (AssignUnit, DropIds, DuplicateRows, Failure, NoMoreUnits, PartRewritten, PartWritten,
                       RankReport, RequestUnit, Stop, UnitRead)

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
    counted: bool = False

    @property
    def committed(self) -> bool:
        return self.read is not None and all(
            gpu in self.written and self.written[gpu].rows == rows for gpu, rows in self.read.sent.items())


@dataclass
class JobResult:
    rows_written: int
    tokens: int
    rejected_rows: int
    shards: list[dict]
    reports: dict[int, RankReport]
    wall_seconds: float


class Conductor:
    def __init__(self, transport: Transport, roles: RoleMap, plan: Plan, output: OutputDir, progress: Progress,
                 name_ranks: bool = False, skip_invalid: bool = False):
        self.t, self.roles, self.plan, self.output, self.progress = transport, roles, plan, output, progress
        self.pending = deque(plan.units)
        self.units = {u.unit: _UnitState() for u in plan.units}
        self.committed = 0
        self.rows_written = self.tokens = self.rejected_rows = 0
        self.shards: list[dict] = []
        self.reports: dict[int, RankReport] = {}
        self.name_ranks, self.skip_invalid = name_ranks, skip_invalid
        self.paths = {f.index: f.path for f in plan.files}
        # unit -> {digest: its reject}: ids to drop once the unit is committed, then while gpus drop them
        self.drops: dict[int, dict[bytes, InputError]] = {}
        self.dropping: dict[int, dict[bytes, InputError]] = {}
        self.rewrites_pending = 0
        if plan.unreadable:
            output.append_rejects([e.as_reject() for e in plan.unreadable])

    def run(self) -> JobResult:
        start = time.monotonic()
        tokenizers_left = set(self.roles.tokenizers)
        stop_sent = False
        while True:
            env = self.t.recv(timeout=0.5)
            self.progress.tick()
            if env is not None:
                self._handle(env.source, env.message)
                tokenizers_left -= set(self.reports)
            all_done = self.committed == len(self.units)
            if all_done and not tokenizers_left and not stop_sent and not self.drops and not self.rewrites_pending:
                for gpu in self.roles.gpus:
                    self.t.send(gpu, Stop())
                stop_sent = True
            if stop_sent and all(g in self.reports for g in self.roles.gpus):
                break
        self.progress.close()
        return JobResult(self.rows_written, self.tokens, self.rejected_rows, self.shards, self.reports,
                         time.monotonic() - start)

    def _handle(self, source: int, message) -> None:
        if isinstance(message, RequestUnit):
            self.t.send(source, AssignUnit(self.pending.popleft()) if self.pending else NoMoreUnits())
        elif isinstance(message, UnitRead):
            self.units[message.unit].read = message
            self.rejected_rows += message.rejected_rows
            self.output.append_rejects(message.rejects)
            self._commit_if_done(message.unit)
        elif isinstance(message, PartWritten):
            self.units[message.unit].written[source] = message
            self.shards.append({"path": message.shard, "rows": message.rows})
            self.rows_written += message.rows
            self.tokens += message.tokens
            self.progress.update(message.rows, message.tokens)
            self._commit_if_done(message.unit)
        elif isinstance(message, DuplicateRows):
            self._duplicates(message)
        elif isinstance(message, PartRewritten):
            self._rewritten(message)
        elif isinstance(message, RankReport):
            self.reports[source] = message
        elif isinstance(message, Failure):
            raise JobFailed(message, self.name_ranks)
        else:
            raise RuntimeError(f"conductor got unexpected {type(message).__name__} from rank {source}")

    def _commit_if_done(self, unit: int) -> None:
        state = self.units[unit]
        if not state.counted and state.committed:
            state.counted = True
            self.committed += 1
        if state.counted and unit in self.drops:
            errors = self.drops.pop(unit)
            self.dropping.setdefault(unit, {}).update(errors)
            for gpu in state.written:
                self.t.send(gpu, DropIds(unit, list(errors)))
                self.rewrites_pending += 1

    def _duplicates(self, message: DuplicateRows) -> None:
        for unit, file, row, first, first_row, digest in message.rows:
            error = InputError(self.paths[file], f"duplicate id, first seen in {self.paths[first]} at row {first_row}",
                               row)
            if not self.skip_invalid:
                raise error
            # Recorded as a reject once the gpu rank has removed it, when the id itself is known again.
            self.drops.setdefault(unit, {})[digest] = error
            self.rejected_rows += 1
        for unit in {r[0] for r in message.rows}:
            self._commit_if_done(unit)

    def _rewritten(self, message: PartRewritten) -> None:
        self.rewrites_pending -= 1
        self.rows_written -= len(message.removed_ids)
        for shard in self.shards:
            if shard["path"] == message.shard:
                shard["rows"] -= len(message.removed_ids)
        errors = self.dropping[message.unit]
        records = []
        for row_id in message.removed_ids:
            error = errors.pop(id_digest(row_id))
            error.row_id = row_id
            records.append(error.as_reject())
        self.output.append_rejects(records)
