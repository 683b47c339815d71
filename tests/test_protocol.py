"""The protocol cores on their own, in-process and in milliseconds: the commit rule, duplicate-id drops and shard
rewrites, the drain on a stop, a rank failing mid-unit, resume, and the credit and window rules. The cores take a
message and return the messages to send, so these tests are the drivers: they deliver by hand and look at what
comes back. The mpiexec and Slurm tests run the same cores for real."""
from __future__ import annotations

import dataclasses
import json
from collections import deque

import numpy as np
import pyarrow as pa
import pytest

from hpcembed.errors import InputError
from hpcembed.io.ids import id_digest
from hpcembed.io.ledger import Ledger
from hpcembed.io.sources import InputFile, Plan, WorkUnit
from hpcembed.io.writer import OutputDir, shard_name
from hpcembed.manifest import EncoderStats, RankStats, TokenizerStats
from hpcembed.protocol.conductor import ConductorCore, JobFailed
from hpcembed.protocol.encoder import EncoderCore
from hpcembed.protocol.messages import (AssignUnit, Credit, Drain, DropIds, DuplicateRows, Failure, NoMoreUnits,
                                        PartRewritten, PartWritten, RankReport, Release, RequestUnit, Stop,
                                        StopRequested, UnitEnd, UnitRead)
from hpcembed.protocol.subconductor import SubConductorCore
from hpcembed.protocol.tokenizer import GRANT_PATIENCE_S, READ_AHEAD_BATCHES, TokenizerCore, UnitProgress
from hpcembed.topology import RoleMap

# Rank 0 conducts; 1 and 2 tokenize; 3 and 4 encode (one host, so every tokenizer links to both encoders).
ROLES = RoleMap(conductor=0, tokenizers=[1, 2], encoders=[3, 4], hosts={r: "h" for r in range(5)})
FILE = InputFile(0, "corpus.jsonl", "jsonl")


def plan_of(*sizes: int) -> Plan:
    units, start = [], 0
    for k, size in enumerate(sizes):
        units.append(WorkUnit(k, FILE, start, start + size))
        start += size
    return Plan([FILE], {0: start}, units, [])


def conductor(tmp_path, plan: Plan, skip_invalid: bool = False, fingerprint: dict | None = None) -> ConductorCore:
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open(fingerprint or {"test": True}, [], overwrite=False)
    return ConductorCore(ROLES, plan, output, output.ledger(), state, skip_invalid=skip_invalid,
                         name_ranks=True)


def ledger_units(tmp_path) -> dict:
    core_ledger = Ledger(tmp_path / "out")
    return core_ledger.load().units


def report(core: ConductorCore, rank: int):
    stats = (EncoderStats if rank in ROLES.encoders else TokenizerStats)(rank, "x", "h")
    return core.handle(rank, RankReport(stats))


# --- the conductor ----------------------------------------------------------------------------------------

def test_a_unit_commits_only_after_every_part(tmp_path):
    core = conductor(tmp_path, plan_of(8))
    assert core.handle(1, RequestUnit()) == [(1, AssignUnit(core.plan.units[0]))]
    # The tokenizer sent 5 rows to encoder 3 and 3 to encoder 4.
    assert core.handle(1, UnitRead(0, {3: 5, 4: 3}, tokens=80)) == []
    core.handle(3, PartWritten(0, shard_name(0, 3), 5, 50))
    assert not core.done and not ledger_units(tmp_path)
    # A part with too few rows is not the part the tokenizer reported.
    core.handle(4, PartWritten(0, shard_name(0, 4), 2, 20))
    assert not core.done
    core.handle(4, PartWritten(0, shard_name(0, 4), 3, 30))
    assert core.all_committed and core.rows_written == 8
    core.ledger.close()
    assert ledger_units(tmp_path)[0].shards == {shard_name(0, 3): 5, shard_name(0, 4): 3}


def test_parts_may_arrive_before_the_unit_is_read(tmp_path):
    core = conductor(tmp_path, plan_of(4, 4))
    core.handle(3, PartWritten(1, shard_name(1, 3), 4, 40))
    assert not core.done
    core.handle(2, UnitRead(1, {3: 4}, tokens=40, rejects=[{"row": 9, "reason": "bad"}], rejected_rows=0))
    assert list(core.done) == [1] and not core.all_committed
    core.ledger.close()
    rejects = (tmp_path / "out" / "_rejects.jsonl").read_text().splitlines()
    assert [json.loads(line)["row"] for line in rejects] == [9]


def test_units_are_handed_out_once_then_no_more(tmp_path):
    core = conductor(tmp_path, plan_of(2, 2, 2))
    got = [core.handle(t, RequestUnit())[0].message for t in (1, 2, 1, 2)]
    assert [m.unit.unit for m in got[:3]] == [0, 1, 2] and isinstance(got[3], NoMoreUnits)


def test_the_job_ends_after_tokenizers_report_then_encoders_stop(tmp_path):
    core = conductor(tmp_path, plan_of(3))
    core.handle(1, UnitRead(0, {3: 3}, tokens=9))
    core.handle(3, PartWritten(0, shard_name(0, 3), 3, 9))
    assert core.poll() == []                            # tokenizers have not reported yet
    assert report(core, 1) == [(1, Release())]
    assert core.poll() == []
    report(core, 2)
    assert core.poll() == [(3, Stop(drain=False)), (4, Stop(drain=False))]
    assert core.poll() == [] and not core.finished      # Stop goes once; the encoders' reports end the job
    report(core, 3), report(core, 4)
    assert core.finished
    result = core.result(1.0, 0.0)
    assert result.rows_written == 3 and result.stopped_early == "" and result.tokens == 9


def test_a_stop_drains_the_tokenizers_and_discards_partial_units(tmp_path):
    core = conductor(tmp_path, plan_of(3, 3, 3))
    core.handle(1, RequestUnit()), core.handle(2, RequestUnit())
    core.handle(1, UnitRead(0, {3: 3}, tokens=9))
    core.handle(3, PartWritten(0, shard_name(0, 3), 3, 9))
    report(core, 2)                                     # tokenizer 2 has already finished
    # A signal on this process: only the tokenizer still reading is told to abandon its unit.
    assert core.poll("SIGTERM") == [(1, Drain())]
    assert core.handle(1, RequestUnit()) == [(1, NoMoreUnits())]   # nothing more is handed out
    report(core, 1)
    assert core.poll() == [(3, Stop(drain=True)), (4, Stop(drain=True))]
    report(core, 3), report(core, 4)
    result = core.result(1.0, 0.0)
    assert core.finished and result.stopped_early == "SIGTERM" and result.rows_written == 3


def test_a_stop_asked_for_by_a_rank_drains_too(tmp_path):
    core = conductor(tmp_path, plan_of(3))
    assert core.handle(2, StopRequested("SIGUSR1")) == []
    assert core.poll() == [(1, Drain()), (2, Drain())]


def test_a_rank_failing_mid_unit_ends_the_job_naming_it(tmp_path):
    core = conductor(tmp_path, plan_of(6))
    core.handle(1, RequestUnit())
    core.handle(3, PartWritten(0, shard_name(0, 3), 2, 9))
    with pytest.raises(JobFailed) as failed:
        core.handle(1, Failure(1, "tokenizer", "corpus.jsonl row 4: not JSON", 3))
    assert failed.value.exit_code == 3 and "[rank 1, tokenizer]" in str(failed.value)
    core.ledger.close()
    assert not ledger_units(tmp_path)                   # nothing of the unit was committed


def test_resume_hands_out_only_uncommitted_units(tmp_path):
    first = conductor(tmp_path, plan_of(2, 2, 2), fingerprint={"job": 1})
    first.handle(1, UnitRead(1, {4: 2}, tokens=4))
    first.handle(4, PartWritten(1, write_shard(tmp_path, 1, 4, ["x", "y"]), 2, 4))
    first.ledger.close()
    first.output.lock.release()                 # the job ends (the launcher releases its output's lock)
    again = conductor(tmp_path, plan_of(2, 2, 2), fingerprint={"job": 1})
    assert again.rows_resumed == 2 and again.units_resumed == 1
    handed = [again.handle(1, RequestUnit())[0].message for _ in range(3)]
    assert [m.unit.unit for m in handed[:2]] == [0, 2] and isinstance(handed[2], NoMoreUnits)


def write_shard(tmp_path, unit: int, rank: int, ids: list[str]) -> str:
    name = shard_name(unit, rank)
    OutputDir(str(tmp_path / "out")).write_shard(name, pa.array(ids), np.eye(len(ids), 4, dtype=np.float32))
    return name


def test_duplicate_ids_fail_the_job_by_default(tmp_path):
    core = conductor(tmp_path, plan_of(2, 2))
    with pytest.raises(InputError, match="duplicate id, first seen in corpus.jsonl at row 0"):
        core.handle(2, DuplicateRows([(1, 0, 2, 0, 0, 0, id_digest("a"))]))


def test_duplicate_ids_are_dropped_from_their_shard_under_skip(tmp_path):
    core = conductor(tmp_path, plan_of(2, 2), skip_invalid=True)
    for unit, ids in ((0, ["a", "b"]), (1, ["c", "a"])):
        name = write_shard(tmp_path, unit, 3, ids)
        core.handle(1, UnitRead(unit, {3: 2}, tokens=4))
        core.handle(3, PartWritten(unit, name, 2, 4))
    # Row 3 (unit 1) repeats the id of row 0: the encoder that wrote unit 1's shard is told to drop it.
    sends = core.handle(2, DuplicateRows([(1, 0, 3, 0, 0, 0, id_digest("a"))]))
    assert sends == [(3, DropIds(1, shard_name(1, 3), [id_digest("a")]))]
    report(core, 1), report(core, 2)
    assert core.poll() == []                            # no Stop while a rewrite is pending
    removed, rewritten = OutputDir(str(tmp_path / "out")).drop_ids(shard_name(1, 3), {id_digest("a")})
    core.handle(3, PartRewritten(1, shard_name(1, 3), removed, *rewritten))
    assert [dest for dest, _ in core.poll()] == [3, 4]
    assert core.rows_written == 3 and core.rejected_rows == 1
    core.ledger.close()
    unit = ledger_units(tmp_path)[1]
    assert unit.shards == {shard_name(1, 3): 1}
    # The ledger holds the rewritten shard's size and checksum, as a rerun's verification needs.
    assert unit.files[shard_name(1, 3)] == [rewritten.size, rewritten.digest]
    assert rewritten.size == (tmp_path / "out" / shard_name(1, 3)).stat().st_size
    reject = json.loads((tmp_path / "out" / "_rejects.jsonl").read_text())
    assert reject["id"] == "a" and reject["row"] == 3 and "first seen in corpus.jsonl at row 0" in reject["reason"]


# --- the tokenizer ----------------------------------------------------------------------------------------

def test_tokenizer_routes_to_most_credit_and_stays_on_ties():
    core = TokenizerCore(1, ROLES)
    assert core.encoders == [3, 4]
    progress = UnitProgress()
    assert core.route(progress) is None                 # no credit yet
    core.handle(3, Credit(2)), core.handle(4, Credit(2))
    first = core.route(progress)
    core.sent(first, 10, 100, progress)
    other = 4 if first == 3 else 3
    assert core.route(progress) == other                # more free credit there
    core.sent(other, 10, 100, progress)
    assert core.route(progress) == other                # a tie: stay with the previous one
    core.sent(other, 5, 50, progress)
    core.sent(first, 5, 50, progress)
    assert core.route(progress) is None                 # all four credits in use
    assert progress.sent == {first: 15, other: 15} and progress.tokens == 300


def test_tokenizer_holds_its_first_batch_briefly_for_every_linked_ranks_grant():
    """A rank that read ahead while the encoder ranks loaded does not send its first batch wherever the first grant
    came from: it waits GRANT_PATIENCE_S from that grant for the others', then goes with what it has."""
    core = TokenizerCore(1, ROLES)
    progress = UnitProgress()
    core.handle(4, Credit(4))
    assert core.route(progress, now=10.0) is None and core.grant_wait(10.01) == pytest.approx(GRANT_PATIENCE_S - 0.01)
    assert core.route(progress, now=10.0 + GRANT_PATIENCE_S) == 4 and core.grant_wait(11.0) is None
    patient = TokenizerCore(2, ROLES)
    patient.handle(4, Credit(4))
    assert patient.route(progress, now=0.0) is None
    patient.handle(3, Credit(4))                        # every grant in: routed at once, by credit
    assert patient.route(progress, now=0.001) in (3, 4) and patient.grant_wait(0.001) is None
    assert TokenizerCore(1, ROLES).route(progress) is None      # no credit: nothing to wait for


def test_tokenizer_reads_ahead_until_the_first_grant():
    """While every linked encoder rank is still building its model, batches are kept and the rank tokenizes on, up
    to READ_AHEAD_BATCHES; from the first grant on, each goes as it is ready. A tokenize job (no links) keeps
    nothing."""
    core = TokenizerCore(1, ROLES)
    assert core.holds(0) and core.holds(READ_AHEAD_BATCHES - 1) and not core.holds(READ_AHEAD_BATCHES)
    core.handle(4, Credit(4))
    assert not core.holds(0)
    tokenize_only = TokenizerCore(1, dataclasses.replace(ROLES, encoders=[]))
    assert not tokenize_only.encoders and not tokenize_only.holds(0)


def test_tokenizer_reports_the_unit_and_waits_for_every_credit():
    core = TokenizerCore(2, ROLES)
    assert core.start() == [(0, RequestUnit())]
    assert core.waiting_for_unit
    unit = WorkUnit(7, FILE, 0, 4)
    core.handle(0, AssignUnit(unit))
    assert core.next_unit() == (unit, [(0, RequestUnit())])    # asks for the next one at once
    core.handle(3, Credit(4)), core.handle(4, Credit(4))
    progress = UnitProgress()
    core.sent(3, 4, 40, progress)
    assert core.unit_read(unit, progress) == [(3, UnitEnd(7, 4)), (0, UnitRead(7, {3: 4}, 40, [], 0))]
    core.handle(0, NoMoreUnits())
    assert core.next_unit() == (None, [])
    assert not core.credits_settled                     # one batch still owes its Credit
    core.handle(3, Credit(1))
    assert core.credits_settled
    sends = core.report(TokenizerStats(2, "tokenizer", "h"))
    assert sends[0].message.stats.batches_sent == {"3": 1, "4": 0}
    core.handle(0, Release())
    assert core.released


def test_a_drain_drops_the_assigned_units():
    core = TokenizerCore(1, ROLES)
    core.handle(0, AssignUnit(WorkUnit(0, FILE, 0, 1)))
    core.handle(0, Drain())
    assert core.draining and not core.waiting_for_unit and core.next_unit() == (None, [])


# --- the encoder ------------------------------------------------------------------------------------------

def test_encoder_window_rule():
    core = EncoderCore(3, ROLES, credits=4, max_batch_tokens=100, window_batches=2)
    assert core.has_room(199) and not core.has_room(200) and not core.has_room(150, arriving_tokens=50)
    # Never less than a batch for each tokenizer rank linked here (two), so that the first batch of each is taken
    # in however many of them send here at once.
    assert EncoderCore(3, ROLES, credits=4, max_batch_tokens=100, window_batches=1).window_tokens == 200
    many = RoleMap(conductor=0, tokenizers=list(range(1, 301)), encoders=[301], fanout=1)
    assert EncoderCore(301, many, credits=4, max_batch_tokens=100, window_batches=8).window_tokens == 100 * 256


def test_encoder_grants_then_credits_each_batch_as_its_tokens_are_submitted():
    core = EncoderCore(3, ROLES, credits=4, max_batch_tokens=100, window_batches=8)
    assert core.start() == [(1, Credit(4)), (2, Credit(4))]
    core.batch_taken(1, 60)
    core.batch_taken(2, 60)
    core.batch_taken(1, 60)
    assert core.submitted(50, window_empty=False) == []                 # batch 1 half submitted
    assert core.submitted(70, window_empty=False) == [(1, Credit(1)), (2, Credit(1))]
    # Whatever is owed when the window empties is credited at once (batches split over encoder batches).
    assert core.submitted(55, window_empty=True) == [(1, Credit(1))]


def test_encoder_part_completes_whichever_comes_last():
    core = EncoderCore(3, ROLES, credits=4, max_batch_tokens=100, window_batches=8)
    assert core.embedded(0, 3, 30) is False                             # UnitEnd not yet here
    assert core.handle(1, UnitEnd(0, 5)) == []
    assert core.embedded(0, 2, 20) is True
    assert core.written(0, "s0") == (0, PartWritten(0, "s0", 5, 50))
    assert core.handle(1, UnitEnd(1, 2)) == []
    assert core.embedded(1, 2, 7) is True
    core.written(1, "s1")
    assert core.embedded(2, 1, 1) is False
    assert core.handle(2, UnitEnd(2, 1)) == [2]                         # the rows came first


def test_encoder_refuses_to_finish_with_open_parts_unless_drained():
    core = EncoderCore(3, ROLES, credits=4, max_batch_tokens=100, window_batches=8)
    core.embedded(0, 3, 30)
    core.handle(0, Stop(drain=False))
    with pytest.raises(RuntimeError, match=r"units \[0\] incomplete"):
        core.finish(EncoderStats(3, "encoder", "h"))
    drained = EncoderCore(3, ROLES, credits=4, max_batch_tokens=100, window_batches=8)
    drained.embedded(0, 3, 30)
    drained.handle(0, Stop(drain=True))
    assert isinstance(drained.finish(EncoderStats(3, "encoder", "h"))[0].message, RankReport)


# --- all three together -----------------------------------------------------------------------------------

def pump_a_job(tmp_path, roles: RoleMap, sizes: list[int], commit_batch: int = 64, heard: list | None = None):
    """A synchronous driver: a message pump between the cores, with 'tokenizing' and 'encoding' reduced to
    counting, and a clock that moves 0.01 s per step. Runs the job to its end: every tokenizer reports and is
    released, then the encoder ranks are stopped. Returns the conductor, the sub-conductors and the encoders.
    `heard`: where given, (source, message) of every message the conductor took is appended to it."""
    plan = plan_of(*sizes)
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    ctor = ConductorCore(roles, plan, output, output.ledger(), state, name_ranks=True)
    tokenizers = {t: TokenizerCore(t, roles) for t in roles.tokenizers}
    encoders = {e: EncoderCore(e, roles, credits=2, max_batch_tokens=30, window_batches=2) for e in roles.encoders}
    subs = {s: SubConductorCore(s, roles, commit_batch=commit_batch) for s in roles.subconductors}
    mail: deque = deque()
    post = lambda src, sends: mail.extend((src, d, m) for d, m in sends)     # noqa: E731
    for rank, core in [*tokenizers.items(), *encoders.items(), *subs.items()]:
        post(rank, core.start())
    window = {e: deque() for e in encoders}             # (unit, rows, tokens) waiting to be encoded
    reading = {t: None for t in tokenizers}
    reported, stopped = set(), set()
    for step in range(100_000):
        now = step * 0.01
        for rank, sub in subs.items():
            post(rank, sub.poll(now))
            if sub.ready_to_report:
                post(rank, sub.report(RankStats(rank, "subconductor", "h")))
        if mail:
            src, dest, message = mail.popleft()
            if dest == 0:
                if heard is not None:
                    heard.append((src, message))
                post(0, ctor.handle(src, message))
                post(0, ctor.poll())
            elif dest in subs:
                post(dest, subs[dest].handle(src, message, now))
            elif dest in tokenizers:
                tokenizers[dest].handle(src, message)
            elif isinstance(message, tuple):            # a token batch
                window[dest].append(message)
                encoders[dest].batch_taken(src, message[2])
            elif isinstance(message, Stop):
                encoders[dest].handle(src, message)
                stopped.add(dest)
            else:
                for unit in encoders[dest].handle(src, message):
                    post(dest, [encoders[dest].written(unit, shard_name(unit, dest))])
            continue
        if stopped == set(encoders):
            break
        # No mail: each tokenizer sends one batch of 2 rows if it can, each encoder encodes what it holds.
        for t, core in tokenizers.items():
            if reading[t] is None:
                unit, sends = core.next_unit()
                post(t, sends)
                if unit is not None:
                    reading[t] = [unit, unit.row_start, UnitProgress()]
                elif not core.waiting_for_unit and core.credits_settled and t not in reported:
                    reported.add(t)
                    post(t, core.report(TokenizerStats(t, "tokenizer", "h")))
            if reading[t] is not None:
                unit, row, progress = reading[t]
                dest = core.route(progress)
                if dest is not None:
                    rows = min(2, unit.row_stop - row)
                    mail.append((t, dest, (unit.unit, rows, 10 * rows)))
                    core.sent(dest, rows, 10 * rows, progress)
                    reading[t][1] += rows
                    if reading[t][1] == unit.row_stop:
                        post(t, core.unit_read(unit, progress))
                        reading[t] = None
        for e, core in encoders.items():
            while window[e]:
                unit, rows, tokens = window[e].popleft()
                post(e, core.submitted(tokens, window_empty=not window[e]))
                if core.embedded(unit, rows, tokens):
                    post(e, [core.written(unit, shard_name(unit, e))])
    assert stopped == set(encoders), "the job did not end"
    assert all(core.released for core in [*tokenizers.values(), *subs.values()])
    assert ctor.all_committed and ctor.rows_written == sum(sizes)
    assert all(u.rows == size for u, size in zip((ctor.done[k] for k in range(len(sizes))), sizes))
    assert all(core.credits_settled for core in tokenizers.values())
    assert not any(core.parts for core in encoders.values())
    return ctor, subs, encoders


def test_the_cores_run_a_job_exactly_once(tmp_path):
    """Every unit is committed once, with every row in exactly one part."""
    ctor, _, _ = pump_a_job(tmp_path, ROLES, [7, 3, 11, 5, 9, 2])
    assert set(ctor.reports) == {1, 2}
