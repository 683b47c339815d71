"""The sub-conductor's core on its own and beside the others, in-process and in milliseconds: blocks of units,
commits batched to rank 0, a drain, the int8 ranges a batched commit waits for, and a duplicate id found before
a batch arrives. The mpiexec test of a sub-conductor killed mid-job is in test_resume.py."""
from __future__ import annotations

import json
from array import array

import pytest

from hpcembed.io.ids import id_digest
from hpcembed.io.ledger import CommittedUnit, Ledger
from hpcembed.io.writer import OutputDir, shard_name
from hpcembed.manifest import RankStats, TokenizerStats
from hpcembed.protocol.conductor import ConductorCore, shares
from hpcembed.protocol.messages import (Calibrated, Drain, DropIds, DuplicateRows, PartRewritten, PartWritten,
                                        RankReport, RankReports, Release, RequestUnit, RequestUnits, UnitGrant,
                                        UnitRead, UnitsCommitted)
from hpcembed.protocol.subconductor import SubConductorCore, pieces_per_unit
from hpcembed.topology import RoleMap

from .conftest import mpirun, needs_mpi, read_manifest, read_output, reference, write_jsonl
from .test_protocol import ledger_units, plan_of, pump_a_job, write_shard

# Two hosts: tokenizers 1 and 2 under sub-conductor 5 on h0, tokenizers 6 and 7 under 8 on h1; encoders 3 and 4.
SUB_ROLES = RoleMap(conductor=0, tokenizers=[1, 2, 6, 7], encoders=[3, 4],
                    hosts={**{r: "h0" for r in range(6)}, **{r: "h1" for r in range(6, 9)}},
                    deputies={1: 5, 2: 5, 6: 8, 7: 8})


def test_sub_conductors_run_a_job_exactly_once_and_commit_in_batches(tmp_path):
    sizes = [7, 3, 11, 5, 9, 2, 4, 4, 6, 1, 8, 3]
    ctor, subs, _ = pump_a_job(tmp_path, SUB_ROLES, sizes, commit_batch=4)
    assert sum(s.units_committed for s in subs.values()) == len(sizes)
    # Batched: fewer UnitsCommitted than units, each sub-conductor its fair share of the units.
    assert sum(s.batches_sent for s in subs.values()) < len(sizes)
    assert all(s.units_committed >= 2 for s in subs.values())
    # The conductor heard from each sub-conductor once at the end, with its tokenizers' reports and its own.
    assert set(ctor.reports) == {1, 2, 5, 6, 7, 8}
    # The manifest's shard list comes from the ledger lines the sub-conductors made.
    assert sum(s["rows"] for s in ctor.result(1.0, 0.0).shards) == sum(sizes)
    ctor.ledger.close()
    assert sorted(ledger_units(tmp_path)) == list(range(len(sizes)))


def test_sub_conductors_commit_through_a_tree_and_rank_0_hears_only_from_its_top(tmp_path):
    """Five nodes, a fan-in of 2: sub-conductors 5 and 8 commit to rank 0, 11 and 14 through 5, 17 through 8. Every
    unit is committed once; rank 0 takes commits and reports from 5 and 8 alone, with every rank's report in them;
    a sub-conductor below sends its commits merged into its parent's."""
    deputies = {t: 5 + 3 * k for k in range(5) for t in (3 + 3 * k, 4 + 3 * k)}
    roles = RoleMap(0, sorted(deputies), [1, 2], hosts={r: f"h{max(0, r - 3) // 3}" for r in range(18)},
                    deputies=deputies, commit_fanin=2)
    assert [roles.commit_parent(s) for s in (5, 8, 11, 14, 17)] == [0, 0, 5, 5, 8]
    assert roles.commit_children(0) == [5, 8] and roles.commit_children(5) == [11, 14]
    assert roles.commit_children(17) == [] and roles.reporters() == [5, 8]
    sizes = [3, 5, 2, 7, 4, 6, 1, 8, 5, 2, 3, 9, 4, 4, 6, 2, 7, 5, 3, 1]
    heard: list = []
    ctor, subs, _ = pump_a_job(tmp_path, roles, sizes, commit_batch=2, heard=heard)
    commits = [(src, m) for src, m in heard if isinstance(m, UnitsCommitted)]
    assert {src for src, _ in commits} == {5, 8}
    assert {src for src, m in heard if isinstance(m, RankReports)} == {5, 8}
    assert set(ctor.reports) == set(deputies) | {5, 8, 11, 14, 17}
    assert sum(len(m.counts) // 3 for _, m in commits) == len(sizes)
    assert all(s.units_committed >= 1 for s in subs.values())
    # Merged on the way up: rank 0 took fewer batches than the sub-conductors sent.
    assert len(commits) < sum(s.batches_sent for s in subs.values())
    ctor.ledger.close()
    assert sorted(ledger_units(tmp_path)) == list(range(len(sizes)))


def test_a_relay_holds_its_childrens_commits_until_they_are_past_their_last():
    deputies = {3: 5, 4: 6, 7: 8}
    roles = RoleMap(0, [3, 4, 7], [1], deputies=deputies, commit_fanin=1)     # 5 <- 6 <- 8: a chain
    relay = SubConductorCore(6, roles, commit_batch=4, commit_seconds=0.5)
    assert (relay.parent, relay.children) == (5, [8])
    early = UnitsCommitted(b"", array("q", [0, 2, 0]), [], 20, 2)
    relay.handle(8, early, now=1.0)
    assert relay.poll(1.1) == []                # the child may commit more
    (dest, batch), = relay.poll(1.5)            # the oldest waited commit_seconds
    assert dest == 5 and batch.counts == early.counts and not batch.last
    relay.handle(8, UnitsCommitted(b"", array("q", [1, 3, 0]), [], 30, 3, last=True), now=2.0)
    relay.handle(0, UnitGrant([], last=True), now=2.0)
    (_, batch), = relay.poll(2.0)               # the child is past its last, and nothing is out here: at once
    assert list(batch.counts) == [1, 3, 0] and batch.last
    assert relay.handle(4, RankReport(TokenizerStats(4, "tokenizer", "h")), now=2.05) == [(4, Release())]
    assert not relay.ready_to_report            # the child has not reported
    relay.handle(8, RankReports([RankStats(8, "subconductor", "h")]), now=2.1)
    assert relay.ready_to_report
    (dest, reports), = relay.report(RankStats(6, "subconductor", "h"))
    assert dest == 5 and [s.rank for s in reports.stats] == [4, 8, 6]
    assert relay.handle(5, Release(), now=2.2) == [(8, Release())]


def test_in_a_drain_a_sub_conductor_sends_what_is_complete_without_waiting_for_its_abandoned_units():
    sub = SubConductorCore(5, SUB_ROLES, commit_batch=64, commit_seconds=0.5)
    sub.start()
    units = plan_of(2, 2).units
    sub.handle(0, UnitGrant(units, last=True), now=0.0)
    sub.handle(1, RequestUnit(), now=0.0)
    sub.handle(2, RequestUnit(), now=0.0)
    sub.handle(1, UnitRead(0, {3: 2}, tokens=20), now=0.1)
    sub.handle(3, PartWritten(0, shard_name(0, 3), 2, 20), now=0.1)
    assert sub.poll(0.2) == []                  # unit 1 is still out
    sub.handle(0, Drain(), now=0.3)             # unit 1 is abandoned: it will not complete
    (dest, batch), = sub.poll(0.3)
    assert dest == 0 and list(batch.counts) == [0, 2, 0] and not batch.last


@needs_mpi
def test_three_nodes_commit_through_a_chain_of_sub_conductors(tmp_path, st_model):
    """Real ranks on three pretend nodes, a sub-conductor each and a fan-in of 1: the third commits and reports
    through the second, the second through the first. Every row is embedded once, as sentence-transformers does,
    and every rank's report reaches the manifest."""
    texts = {f"r{k}": f"line {k} " + "word " * (k % 17) for k in range(600)}
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    out = tmp_path / "out"
    proc = mpirun(10, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--unit-rows", "40",
                  "--chunk-rows", "16", "--tokenizer-ranks", "7", "--sub-conductors", "per-node",
                  "--commit-fanin", "1", env={"HPCEMBED_VIRTUAL_NODES": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ids = read_output(out), sorted(texts)
    assert set(got) == set(texts)
    ref = reference(st_model, [texts[i] for i in ids])
    assert min(float(got[i] @ r) for i, r in zip(ids, ref)) >= 0.9999
    manifest = read_manifest(out)
    roles = [r["role"] for r in manifest["ranks"]]
    assert roles.count("subconductor") == 3 and roles.count("tokenizer") + roles.count("encoder") == 6, roles
    subs = [r for r in manifest["ranks"] if r["role"] == "subconductor"]
    assert sum(s["units_committed"] for s in subs) == 15 and all(s["units_committed"] > 0 for s in subs), subs


def test_grants_keep_to_each_nodes_share_whatever_order_they_are_asked_in(tmp_path):
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    ctor = ConductorCore(SUB_ROLES, plan_of(*[1] * 20), output, output.ledger(), state)
    # 20 units, two sub-conductors of two tokenizers each: a share of 10 each. The first to ask, asking again and
    # again, gets its share and then one unit a request, so the second still finds its share when it asks.
    first = [len(ctor.handle(5, RequestUnits(8))[0].message.units) for _ in range(3)]
    assert first == [8, 2, 1]
    grant = ctor.handle(8, RequestUnits(8))[0].message
    assert len(grant.units) == 8 and not grant.last
    last = ctor.handle(8, RequestUnits(8))[0].message
    assert len(last.units) == 1 and last.last


def test_grants_to_nodes_of_unequal_size_follow_their_tokenizer_ranks(tmp_path):
    roles = RoleMap(conductor=0, tokenizers=[1, 2, 3, 6], encoders=[4, 7],
                    hosts={**{r: "h0" for r in range(6)}, **{r: "h1" for r in range(6, 9)}},
                    deputies={1: 5, 2: 5, 3: 5, 6: 8})
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    ctor = ConductorCore(roles, plan_of(*[1] * 40), output, output.ledger(), state)
    # Three tokenizer ranks against one: 30 and 10 of 40, asked for in blocks larger than either share.
    assert len(ctor.handle(8, RequestUnits(64))[0].message.units) == 10
    assert len(ctor.handle(5, RequestUnits(64))[0].message.units) == 30


def test_shares_add_up_and_follow_the_weights():
    assert shares(10, {5: 2, 8: 1}) == {5: 7, 8: 3}
    assert shares(7, {5: 1, 8: 1, 9: 1}) in ({5: 3, 8: 2, 9: 2}, {5: 2, 8: 3, 9: 2}, {5: 2, 8: 2, 9: 3})
    assert sum(shares(50_000, {s: 111 - (s == 0) for s in range(1000)}).values()) == 50_000
    assert shares(3, {}) == {}


def test_a_node_with_fewer_units_than_waiting_ranks_cuts_them_into_a_piece_each(tmp_path):
    """Two units of 40 and 20 rows for a node whose four tokenizer ranks all wait: four pieces in proportion,
    each rank one, the splits sent on ahead of the commits, and rank 0's plan gets every row once."""
    roles = RoleMap(conductor=0, tokenizers=[1, 2, 3, 4], encoders=[6], hosts={r: "h" for r in range(7)},
                    deputies={t: 5 for t in (1, 2, 3, 4)})
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    ctor = ConductorCore(roles, plan_of(40, 20), output, output.ledger(), state, steal_rows=5)
    sub = SubConductorCore(5, roles, commit_batch=8, commit_seconds=60.0, steal_rows=5)
    [(_, ask)] = sub.start()
    for t in (1, 2, 3, 4):
        assert sub.handle(t, RequestUnit(), 0.0) == []
    [(_, grant)] = ctor.handle(5, RequestUnits(ask.count))
    assigned = {dest: message.unit for dest, message in sub.handle(0, grant, 0.0)}
    assert sorted(assigned) == [1, 2, 3, 4]
    assert sorted((u.row_start, u.row_stop) for u in assigned.values()) == [(0, 13), (13, 26), (26, 40), (40, 60)]
    assert pieces_per_unit([40, 20], 4, 5) == [3, 1] and pieces_per_unit([40, 20], 4, 20) == [2, 1]
    for t, unit in assigned.items():
        sub.handle(t, UnitRead(unit.unit, {6: unit.rows}, unit.rows), 0.0)
        sub.handle(6, PartWritten(unit.unit, f"part-{unit.unit}", unit.rows, unit.rows), 0.0)
    [(_, batch)] = sub.poll(0.1)
    assert batch.splits == [[0, 26], [0, 13]]
    ctor.handle(5, batch)
    assert ctor.all_committed
    assert sorted((u.row_start, u.row_stop) for u in ctor.settled_plan().units) == sorted(
        (u.row_start, u.row_stop) for u in assigned.values())


def test_a_sub_conductor_holds_complete_units_until_a_batch_is_due():
    sub = SubConductorCore(5, SUB_ROLES, commit_batch=3, commit_seconds=0.5)
    (_, ask), = sub.start()
    assert ask == RequestUnits(2)
    units = plan_of(2, 2, 2, 2).units
    sub.handle(0, UnitGrant(units, last=True), now=0.0)
    for t in (1, 2, 1, 2):
        sub.handle(t, RequestUnit(), now=0.0)
    for unit in units[:2]:
        sub.handle(1, UnitRead(unit.unit, {3: 2}, tokens=20), now=1.0)
        sub.handle(3, PartWritten(unit.unit, shard_name(unit.unit, 3), 2, 20), now=1.0)
    assert sub.poll(1.2) == []                  # 2 complete, 2 still out, the oldest waited 0.2 s
    (dest, batch), = sub.poll(1.5)              # ... now 0.5 s
    assert dest == 0 and list(batch.counts) == [0, 2, 0, 1, 2, 0] and batch.tokens == 40
    assert [json.loads(line)["unit"] for line in batch.records.split(b"\n")[:-1]] == [0, 1]
    sub.handle(2, UnitRead(2, {3: 2}, tokens=20), now=2.0)
    sub.handle(3, PartWritten(2, shard_name(2, 3), 2, 20), now=2.0)
    sub.handle(2, UnitRead(3, {}, tokens=0, rejected_rows=2), now=2.0)
    (_, batch), = sub.poll(2.0)                 # nothing else is out: sent at once
    assert list(batch.counts) == [2, 2, 0, 3, 0, 2]
    assert not sub.ready_to_report              # its tokenizers have not reported
    for t in (1, 2):
        assert sub.handle(t, RankReport(TokenizerStats(t, "tokenizer", "h")), now=3.0) == [(t, Release())]
    assert sub.ready_to_report


def test_a_sub_conductor_passes_a_drain_on_and_ignores_the_abandoned_units():
    sub = SubConductorCore(5, SUB_ROLES)
    sub.start()
    sub.handle(0, UnitGrant(plan_of(2, 2).units, last=False), now=0.0)
    sub.handle(1, RequestUnit(), now=0.0)
    assert sub.handle(0, Drain(), now=0.1) == [(1, Drain()), (2, Drain())]
    for t in (1, 2):
        sub.handle(t, RankReport(TokenizerStats(t, "tokenizer", "h")), now=0.2)
    assert sub.ready_to_report                  # unit 0 was abandoned, not waited for
    sub.report(RankStats(5, "subconductor", "h"))
    assert sub.handle(3, PartWritten(0, shard_name(0, 3), 1, 10), now=0.3) == []
    assert sub.poll(1.0) == []


def test_commits_from_sub_conductors_wait_for_the_calibration_ranges(tmp_path):
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    ctor = ConductorCore(SUB_ROLES, plan_of(2), output, output.ledger(), state, ranges_due=True)
    ctor.handle(5, RequestUnits(2))
    record = CommittedUnit(0, {shard_name(0, 3): 2}, 20)
    ctor.handle(5, UnitsCommitted(Ledger.unit_line(record).encode(), array("q", [0, 2, 0]), [], 20, 2))
    assert not ctor.done
    ctor.handle(3, Calibrated([[0.0], [1.0]]))
    assert ctor.all_committed
    ctor.ledger.close()
    assert Ledger(tmp_path / "out").load().ranges == [[0.0], [1.0]]


def test_a_duplicate_found_before_a_sub_conductor_commits_its_unit_is_dropped_once_it_does(tmp_path):
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    core = ConductorCore(SUB_ROLES, plan_of(2, 2), output, output.ledger(), state, skip_invalid=True)
    core.handle(5, RequestUnits(2))
    names = [write_shard(tmp_path, unit, 3, ids) for unit, ids in ((0, ["a", "b"]), (1, ["c", "a"]))]
    first = CommittedUnit(0, {names[0]: 2}, 4)
    core.handle(5, UnitsCommitted(Ledger.unit_line(first).encode(), array("q", [0, 2, 0]), [], 4, 2))
    # Unit 1 is complete at its sub-conductor but not yet sent on when the repeat is found: nothing to drop yet.
    assert core.handle(2, DuplicateRows([(1, 0, 3, 0, 0, 0, id_digest("a"))])) == []
    second = CommittedUnit(1, {names[1]: 2}, 4)
    sends = core.handle(5, UnitsCommitted(Ledger.unit_line(second).encode(), array("q", [1, 2, 0]), [], 4, 2))
    assert sends == [(3, DropIds(1, shard_name(1, 3), [id_digest("a")]))]
    removed, rewritten = output.drop_ids(shard_name(1, 3), {id_digest("a")})
    core.handle(3, PartRewritten(1, shard_name(1, 3), removed, *rewritten))
    assert core.rows_written == 3 and core.rejected_rows == 1
    assert core.result(1.0, 0.0).shards == [{"path": names[0], "rows": 2}, {"path": names[1], "rows": 1}]


def test_the_commit_wait_grows_with_the_sub_conductors_rank_0_hears_from():
    """Rank 0 takes a bounded batch rate: the wait grows with the sub-conductors that commit to it, which the
    commit tree caps at its fan-in."""
    from hpcembed.protocol.subconductor import COMMIT_SECONDS, CONDUCTOR_BATCHES_PER_S, commit_seconds_for
    many = 4 * CONDUCTOR_BATCHES_PER_S
    deputies = {many + k: k + 1 for k in range(many)}         # a sub-conductor for each tokenizer rank
    wide = RoleMap(0, sorted(deputies), [], deputies=deputies, commit_fanin=many)
    assert commit_seconds_for(wide) == pytest.approx(4.0)
    assert commit_seconds_for(RoleMap(0, sorted(deputies), [], deputies=deputies)) == COMMIT_SECONDS
    assert commit_seconds_for(SUB_ROLES) == COMMIT_SECONDS
    assert SubConductorCore(5, SUB_ROLES).commit_seconds == commit_seconds_for(SUB_ROLES)


def test_committed_units_keep_batches_whole_and_make_a_units_record_on_demand():
    """The conductor's store of batched commits: membership, count, order and each unit's record as if it had been
    kept per unit, a reject holding a line separator that str.splitlines would cut at, and a parsed record
    replacing its batch entry."""
    from hpcembed.io.committed import CommittedUnits
    own = CommittedUnit(9, {shard_name(9, 3): 5}, 50)
    units = CommittedUnits({9: own})
    records = [CommittedUnit(u, {shard_name(u, 3): 10 + u}, 100, rejected=u % 2,
                             rejects=[{"id": f"odd\u2028id {u}", "error": "empty"}] * (u % 2)) for u in range(4)]
    for first in (0, 2):
        part = records[first: first + 2]
        units.add_batch(UnitsCommitted("".join(Ledger.unit_line(r) for r in part).encode(),
                                       array("q", [n for r in part for n in (r.unit, r.rows, r.rejected)]), [], 0,
                                       sum(r.rows + r.rejected for r in part)))
        # A lookup between batches indexes those so far; the next batch's units are found all the same.
        assert first in units and first + 2 not in units and len(units) == 1 + first + 2
    assert len(units) == 5 and list(units) == [9, 0, 1, 2, 3]
    assert 3 in units and 4 not in units and units[9] is own
    for r in records:
        got = units[r.unit]
        assert (got.unit, got.rows, got.rejected) == (r.unit, r.rows, r.rejected)
        assert got.parse() == r
    assert [(u, rec.rows) for u, rec in units.items()] == [(9, 5), (0, 10), (1, 11), (2, 12), (3, 13)]
    units[1] = units[1].parse()
    assert len(units) == 5 and units[1] == records[1]
    assert [u for u, _ in units.items()] == list(units) == [9, 0, 1, 2, 3]      # commit order kept
    assert next(rec for u, rec in units.items() if u == 1) is units[1]
    with pytest.raises(KeyError):
        units[4]
    assert [(r.unit, r.rows) for r in units.whole_records()] == [(9, 5)] + [(r.unit, r.rows) for r in records]
    assert all(isinstance(r, CommittedUnit) for r in units.whole_records())
