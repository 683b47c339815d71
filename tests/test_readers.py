"""Readers and planning: every format, unit boundaries, row numbers, ids, and row-level validation."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcembed.errors import ConfigError, InputError
from hpcembed.io.readers import Columns, read_unit
from hpcembed.io.sources import plan_job, resolve_inputs

from .conftest import write_jsonl

COLS = Columns("text", "")


def read_all(plan, columns=COLS, chunk_rows=3):
    rows, ids, texts, rejects = [], [], [], []
    for unit in plan.units:
        for chunk in read_unit(unit, columns, chunk_rows):
            assert len(chunk.texts) <= chunk_rows
            rows += chunk.rows.tolist()
            ids += chunk.ids
            texts += chunk.texts
            rejects += chunk.rejects
    return rows, ids, texts, rejects


def plan_of(*paths, unit_rows=4, skip=False):
    return plan_job(resolve_inputs([str(p) for p in paths]), unit_rows, skip)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 9])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_text_units_cover_every_line_once(tmp_path, n, trailing_newline):
    lines = [f"line {k}" for k in range(n)]
    body = "\n".join(lines) + ("\n" if trailing_newline and n else "")
    (tmp_path / "c.txt").write_text(body)
    plan = plan_of(tmp_path / "c.txt")
    assert plan.total_rows == n
    assert [u.rows for u in plan.units] == [min(4, n - s) for s in range(0, n, 4)]
    rows, ids, texts, rejects = read_all(plan)
    assert texts == lines and rows == list(range(n)) and not rejects
    assert ids == [f"c:{k}" for k in range(n)]


def test_text_keeps_empty_lines_and_strips_crlf(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"a\r\n\r\n  \nlast")
    rows, ids, texts, _ = read_all(plan_of(tmp_path / "c.txt"))
    assert texts == ["a", "", "  ", "last"]


def test_jsonl_ids_and_units(tmp_path):
    recs = [{"id": f"r{k}", "text": f"t{k}", "other": k} for k in range(10)]
    write_jsonl(tmp_path / "a.jsonl", recs)
    plan = plan_of(tmp_path / "a.jsonl", unit_rows=3)
    assert len(plan.units) == 4 and plan.units[1].byte_start > 0
    rows, ids, texts, rejects = read_all(plan, chunk_rows=2)
    assert ids == [r["id"] for r in recs] and texts == [r["text"] for r in recs] and not rejects


def test_jsonl_gz_is_one_unit(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        for k in range(7):
            fh.write(json.dumps({"text": f"t{k}"}) + "\n")
    plan = plan_of(tmp_path / "a.jsonl.gz", unit_rows=2)
    assert plan.total_rows == 7 and len(plan.units) == 1
    _, ids, texts, _ = read_all(plan)
    assert texts == [f"t{k}" for k in range(7)] and ids[0] == "a:0"


def test_jsonl_row_errors_name_the_row(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "ok", "text": "fine"}, {"id": "n", "text": None}, {"id": "i", "text": 5}, {"id": "m"},
        "not json", "", "[1, 2]", {"id": None, "text": "x"}])
    with open(tmp_path / "bad.jsonl", "ab") as fh:
        fh.write(b'{"id": "u", "text": "\xff\xfe"}\n')
    _, ids, texts, rejects = read_all(plan_of(tmp_path / "bad.jsonl", unit_rows=100))
    assert ids == ["ok"]
    by_row = {e.row: e for e in rejects}
    assert set(by_row) == {1, 2, 3, 4, 5, 6, 7, 8}
    assert "null" in by_row[1].reason and by_row[1].row_id == "n"
    assert "a number, not a string" in by_row[2].reason
    assert "no text key 'text'" in by_row[3].reason
    assert "invalid JSON" in by_row[4].reason and "empty line" in by_row[5].reason
    assert "not a JSON object" in by_row[6].reason
    assert "invalid UTF-8" in by_row[8].reason
    assert str(tmp_path / "bad.jsonl") in by_row[8].describe() and "row 8" in by_row[8].describe()


def test_parquet_units_follow_row_groups(tmp_path):
    table = pa.table({"text": [f"t{k}" for k in range(10)], "id": list(range(100, 110))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    plan = plan_of(tmp_path / "p.parquet", unit_rows=5)
    assert [u.row_groups for u in plan.units] == [(0, 1), (2, 3)]
    rows, ids, texts, _ = read_all(plan)
    assert rows == list(range(10)) and ids == [str(k) for k in range(100, 110)]


def test_parquet_nulls_and_types(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    _, ids, _, rejects = read_all(plan_of(tmp_path / "n.parquet"))
    assert ids == ["n:0", "n:2"] and rejects[0].row == 1 and "null" in rejects[0].reason
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(InputError, match="has type int64, expected string"):
        read_all(plan_of(tmp_path / "i.parquet"))
    with pytest.raises(InputError, match="no text column 'body'"):
        read_all(plan_of(tmp_path / "n.parquet"), Columns("body", ""))
    with pytest.raises(InputError, match="no id column 'key'"):
        read_all(plan_of(tmp_path / "n.parquet"), Columns("text", "key"))


def test_csv_quoted_newlines_and_bad_utf8(tmp_path):
    (tmp_path / "c.csv").write_bytes(b'id,text\na,"multi\nline"\nb,plain\nc,"\xff bad"\nd,\n')
    plan = plan_of(tmp_path / "c.csv")
    assert plan.total_rows == 4
    rows, ids, texts, rejects = read_all(plan)
    assert ids == ["a", "b", "d"] and texts == ["multi\nline", "plain", ""]
    assert rejects[0].row == 2 and rejects[0].row_id == "c" and "invalid UTF-8" in rejects[0].reason


def test_corrupt_file_named_at_planning(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="x.parquet: cannot read parquet file"):
        plan_of(tmp_path / "x.parquet")
    plan = plan_of(tmp_path / "x.parquet", skip=True)
    assert plan.units == [] and plan.unreadable[0].path.endswith("x.parquet")


def test_resolve_directories_and_globs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.txt", "a.jsonl", "_skip.txt", "notes.md"):
        (tmp_path / "d" / name).write_text("x\n")
    files = resolve_inputs([str(tmp_path / "d")])
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "b.txt"]
    assert len(resolve_inputs([str(tmp_path / "d" / "*.txt")])) == 2
    with pytest.raises(ConfigError, match="matches no files"):
        resolve_inputs([str(tmp_path / "nothing-*.txt")])
