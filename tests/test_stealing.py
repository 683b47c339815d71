"""Tail stealing (protocol/stealing.py): the cores in-process, pieces read from real files of every format, and
real MPI jobs in which an idle tokenizer rank takes half of another's unit, with both planes, then resume from
a ledger that holds a split."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcembed.io.ledger import Ledger
from hpcembed.io.readers import Columns, read_unit
from hpcembed.io.sources import InputFile, Plan, WorkUnit, piece_number, plan_job, resolve_inputs, split_unit
from hpcembed.io.writer import OutputDir
from hpcembed.manifest import TokenizerStats
from hpcembed.protocol.conductor import ConductorCore
from hpcembed.protocol.messages import (AssignUnit, NoMoreUnits, PartWritten, RankReport, Release, RequestUnit,
                                        SplitUnit, UnitRead, UnitSplit)
from hpcembed.protocol.tokenizer import TokenizerCore
from hpcembed.topology import RoleMap

from .conftest import mpirun, needs_mpi, read_manifest, read_output, reference, write_jsonl

ROLES = RoleMap(conductor=0, tokenizers=[1, 2], encoders=[3], hosts={r: "h" for r in range(4)})
FILE = InputFile(0, "corpus.jsonl", "jsonl")


def test_a_reading_rank_cuts_after_the_rows_in_hand_and_keeps_the_first_half():
    core = TokenizerCore(1, ROLES, steal_rows=10)
    core.handle(0, AssignUnit(WorkUnit(5, FILE, 100, 200)))
    core.handle(0, AssignUnit(WorkUnit(6, FILE, 200, 215)))
    unit, _ = core.next_unit()
    core.position = 140                                 # rows 100-139 in hand: 60 left, cut at 170
    [(dest, answer)] = core.handle(0, SplitUnit(5))
    assert dest == 0 and answer.cut == 170 and core.reading.row_stop == 170
    assert answer.piece == WorkUnit(piece_number(unit, 170), FILE, 170, 200, seek_row=100)
    core.position = 160                                 # 10 left: a half would be under 10 rows
    assert core.handle(0, SplitUnit(5))[0].message == UnitSplit(5)
    # The unit queued behind it (15 rows) is too small; a unit this rank does not hold is refused.
    assert core.handle(0, SplitUnit(6))[0].message == UnitSplit(6)
    assert core.handle(0, SplitUnit(99))[0].message == UnitSplit(99)


def test_a_unit_not_begun_is_cut_in_the_middle():
    core = TokenizerCore(1, ROLES, steal_rows=10)
    core.handle(0, AssignUnit(WorkUnit(5, FILE, 0, 100)))
    core.handle(0, AssignUnit(WorkUnit(6, FILE, 100, 160)))
    core.next_unit()
    answer = core.handle(0, SplitUnit(6))[0].message
    assert answer.cut == 130 and list(core.assigned) == [WorkUnit(6, FILE, 100, 130)]
    assert TokenizerCore(1, ROLES).handle(0, SplitUnit(6))[0].message == UnitSplit(6)     # stealing off


def _conductor(tmp_path, plan: Plan, steal_rows: int = 10) -> ConductorCore:
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    return ConductorCore(ROLES, plan, output, output.ledger(), state, name_ranks=True, steal_rows=steal_rows)


def _commit(core: ConductorCore, unit: WorkUnit, reader: int) -> None:
    core.handle(reader, UnitRead(unit.unit, {3: unit.rows}, unit.rows))
    core.handle(3, PartWritten(unit.unit, f"part-{unit.unit}", unit.rows, unit.rows))


def _answer_after_20_rows(roles: RoleMap, assigner: int, unit: WorkUnit) -> UnitSplit:
    """Rank 1's answer to a SplitUnit of `unit` (from `assigner`) once it has read 20 of its rows."""
    reader = TokenizerCore(1, roles, steal_rows=10)
    reader.handle(assigner, AssignUnit(unit))
    reader.next_unit()
    reader.position = 20
    [(_, answer)] = reader.handle(assigner, SplitUnit(unit.unit))
    return answer


def test_the_conductor_splits_the_last_unit_for_an_idle_rank_and_records_it_first(tmp_path):
    unit = WorkUnit(0, FILE, 0, 100)
    core = _conductor(tmp_path, Plan([FILE], {0: 100}, [unit], []))
    assert core.handle(1, RequestUnit()) == [(1, AssignUnit(unit))]
    assert core.handle(1, RequestUnit()) == []          # reading its unit: it waits, and is not given half of one
    assert core.handle(2, RequestUnit()) == [(1, SplitUnit(0))]
    answer = _answer_after_20_rows(ROLES, 0, unit)
    piece = answer.piece
    assert core.handle(1, answer) == [(2, AssignUnit(piece))]
    core.ledger.close()
    assert Ledger(tmp_path / "out").load().splits == [[0, 60]]      # in the ledger before the piece went out
    assert [u.rows for u in core.plan.units] == [60, 40] and not core.all_committed
    # Rank 1 reads its 60 rows and is idle: the piece (40 rows) still splits into halves of at least 10.
    assert core.handle(1, UnitRead(0, {3: 60}, 60)) == [(2, SplitUnit(piece.unit))]
    core.handle(3, PartWritten(0, "part-0", 60, 60))
    assert core.handle(2, UnitSplit(piece.unit)) == [(1, NoMoreUnits())]     # refused: nothing left to split
    _commit(core, piece, 2)
    assert core.handle(2, RequestUnit()) == [(2, NoMoreUnits())]
    assert core.all_committed and core.rows_written == 100


def test_a_rank_that_reports_with_a_split_unanswered_is_released_after_its_answer(tmp_path):
    units = [WorkUnit(0, FILE, 0, 100)]
    core = _conductor(tmp_path, Plan([FILE], {0: 100}, units, []))
    core.handle(1, RequestUnit())
    assert core.handle(2, RequestUnit()) == [(1, SplitUnit(0))]
    _commit(core, units[0], 1)                          # read before the SplitUnit reached it
    assert core.handle(1, RankReport(TokenizerStats(1, "tokenizer", "h"))) == []
    assert sorted(core.handle(1, UnitSplit(0)), key=lambda send: send.dest) == [(1, Release()), (2, NoMoreUnits())]


class ProgressSeen:
    def __init__(self):
        self.rows = 0

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows


def test_a_sub_conductors_split_reaches_rank_0_in_its_batch_and_the_plan_when_asked_for(tmp_path):
    """A sub-conductor splits its unit for an idle rank; its batch tells rank 0 the split and the units' input
    rows. Rank 0 counts the rows and the commits at once, and applies the split to its plan only when the plan's
    units are asked for (the manifest), not for every batch."""
    from hpcembed.protocol.messages import RequestUnits, UnitsCommitted
    from hpcembed.protocol.subconductor import SubConductorCore
    roles = RoleMap(conductor=0, tokenizers=[1, 2], encoders=[3], hosts={r: "h" for r in range(5)},
                    deputies={1: 4, 2: 4})
    unit = WorkUnit(0, FILE, 0, 100)
    output = OutputDir(str(tmp_path / "out"))
    _, state = output.open({"test": True}, [], overwrite=False)
    progress = ProgressSeen()
    core = ConductorCore(roles, Plan([FILE], {0: 100}, [unit], []), output, output.ledger(), state,
                         progress=progress, steal_rows=10)
    sub = SubConductorCore(4, roles, commit_batch=2, commit_seconds=60.0, steal_rows=10)
    [(_, ask)] = sub.start()
    [(_, grant)] = core.handle(4, RequestUnits(ask.count))
    assert sub.handle(0, grant, 0.0) == []
    assert sub.handle(1, RequestUnit(), 0.0) == [(1, AssignUnit(unit))]
    assert sub.handle(2, RequestUnit(), 0.0) == [(1, SplitUnit(0))]
    answer = _answer_after_20_rows(roles, 4, unit)
    piece = answer.piece
    assert sub.handle(1, answer, 0.0) == [(2, AssignUnit(piece))]
    for part, reader_rank in ((WorkUnit(0, FILE, 0, 60), 1), (piece, 2)):
        sub.handle(reader_rank, UnitRead(part.unit, {3: part.rows - 2}, part.rows, rejected_rows=2), 0.0)
        sub.handle(3, PartWritten(part.unit, f"part-{part.unit}", part.rows - 2, part.rows), 0.0)
    [(_, batch)] = sub.poll(0.1)
    assert isinstance(batch, UnitsCommitted) and batch.splits == [[0, 60]] and batch.input_rows == 100
    core.handle(4, batch)
    assert core.all_committed and progress.rows == 96          # 100 rows read, 2 of each part rejected
    assert len(core.plan.units) == 1                            # not applied for the batch
    result = core.result(1.0, 0.0)
    assert [u.rows for u in core.plan.units] == [60, 40] and core.plan.splits == 1
    assert core.rows_written == 96 and sum(s["rows"] for s in result.shards) == 96
    core.ledger.close()
    assert Ledger(tmp_path / "out").load().splits == [[0, 60]]


def test_resume_plans_the_recorded_splits(tmp_path):
    plan = Plan([FILE], {0: 300}, [WorkUnit(0, FILE, 0, 100), WorkUnit(1, FILE, 100, 300)], [])
    plan.split(1, 200)
    piece = piece_number(plan.units[1], 200)
    plan.split(piece, 250)                              # a piece split again
    assert [(u.row_start, u.row_stop) for u in plan.units] == [(0, 100), (100, 200), (200, 250), (250, 300)]
    assert plan.units[3].seek_row == 100 and plan.units[3].unit == piece_number(plan.units[1], 250)
    with pytest.raises(ValueError):
        plan.split(0, 100)                              # not inside the unit


@pytest.mark.parametrize("fmt", ["text", "jsonl", "jsonl.gz", "csv", "parquet"])
def test_a_piece_reads_exactly_its_rows(tmp_path, fmt):
    rows = [f"row {k}" for k in range(50)]
    path = tmp_path / f"in.{ {'text': 'txt'}.get(fmt, fmt) }"
    if fmt == "text":
        path.write_text("".join(r + "\n" for r in rows))
    elif fmt == "jsonl":
        write_jsonl(path, [{"text": r} for r in rows])
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps({"text": r}) + "\n" for r in rows).encode()))
    elif fmt == "csv":
        path.write_text("text\n" + "".join(f'"{r}"\n' for r in rows))
    else:
        pq.write_table(pa.table({"text": rows}), path, row_group_size=7)
    plan = plan_job(resolve_inputs([str(path)]), 28 if fmt == "parquet" else 25, False)
    unit = plan.units[-1]
    head, piece = split_unit(unit, unit.row_start + 9)
    again_head, last = split_unit(piece, piece.row_start + 8)
    read = {}
    for part in (plan.units[:-1] + [head, again_head, last]):
        texts = [t for chunk in read_unit(part, Columns("text", ""), 4) for t in chunk.texts]
        read[part.unit] = texts
    assert [t for part in read.values() for t in part] == rows
    assert read[last.unit] == rows[last.row_start:last.row_stop]


@needs_mpi
@pytest.mark.parametrize("plane", [pytest.param("off", marks=pytest.mark.slow), "per-node"])
def test_idle_tokenizer_ranks_take_halves_of_the_last_unit(tmp_path, st_model, plane):
    """One unit of 1,200 rows and two tokenizer ranks: the one without it steals, the pieces are split again,
    and every row is embedded once. Then a crash is made of the ledger after the first split and the first commit
    after it: the resumed job plans the split and redoes only the rest."""
    texts = {f"r{k}": f"line {k} " + "word " * (k % 23) for k in range(1200)}
    write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--unit-rows", "1200",
            "--chunk-rows", "16", "--steal-rows", "16", "--sub-conductors", plane]
    # The conductor, an encoder rank and two tokenizer ranks (a sub-conductor takes one of three).
    args += ["--tokenizer-ranks", "3"] if plane == "per-node" else ["--tokenizer-ranks", "2"]
    ranks = 5 if plane == "per-node" else 4
    proc = mpirun(ranks, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = sorted(texts)
    ref = dict(zip(ids, reference(st_model, [texts[i] for i in ids])))

    def check() -> dict:
        got = read_output(tmp_path / "out")
        assert set(got) == set(texts)
        assert min(float(got[i] @ ref[i]) for i in ids) >= 0.9999
        return read_manifest(tmp_path / "out")

    manifest = check()
    assert [r["rows"] > 0 for r in manifest["ranks"] if r["role"] == "tokenizer"] == [True, True]
    assert manifest["units_split"] >= 1 and manifest["settings"]["unit_sizes"] == [[1200, 1]]     # as planned
    ledger = (tmp_path / "out" / "_ledger.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in ledger]
    assert "split" in kinds and kinds.index("split") < kinds.index("unit")
    # A crash after the first split and the first commit that followed it.
    keep = kinds.index("unit", kinds.index("split")) + 1
    (tmp_path / "out" / "_ledger.jsonl").write_text("".join(line + "\n" for line in ledger[:keep]))
    (tmp_path / "out" / "_SUCCESS").unlink()
    proc = mpirun(ranks, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = check()
    assert manifest["units_resumed"] == 1 and 0 < manifest["rows_written_this_run"] < 1200
    assert manifest["units_split"] >= 1                 # the split the ledger kept, and any made this run
