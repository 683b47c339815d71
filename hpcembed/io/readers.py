"""Read one work unit as chunks of (row numbers, ids, texts), validating every row.

Readers never raise for a bad row: they return it as an InputError in the chunk, so the caller decides between
failing fast and skipping. A problem with the whole file (missing column, corrupt data) raises InputError.
Memory is bounded by the chunk size whatever the file size.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..arrow_arrays import numeric
from ..errors import InputError
from . import location
from .sources import WorkUnit, _short

STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())


@dataclass
class RowChunk:
    rows: np.ndarray                 # int64 row numbers within the file
    ids: list[str]
    texts: list[str]                 # empty when the input is already tokenized
    rejects: list[InputError] = field(default_factory=list)
    tokens: pa.ListArray | None = None   # list<int32> token ids per row, from a token directory

    @property
    def span(self) -> tuple[int, int] | None:
        """The first and last row the chunk holds, valid or rejected (None: it holds none)."""
        rows = [e.row for e in self.rejects if e.row is not None]
        if len(self.rows):
            rows += [int(self.rows[0]), int(self.rows[-1])]
        return (min(rows), max(rows)) if rows else None

    def take(self, keep: np.ndarray) -> "RowChunk":
        return RowChunk(self.rows[keep], [self.ids[k] for k in keep],
                        [self.texts[k] for k in keep] if self.texts else [], [],
                        self.tokens.take(numeric(keep, pa.int64())) if self.tokens is not None else None)


@dataclass(frozen=True)
class Columns:
    text: str
    id: str             # "" means: 'id' when present, else generated
    # Token directories: the model's maximum length and vocabulary size, which every token row must respect.
    token_limits: tuple[int, int] | None = None


def clip_rows(chunk: RowChunk, start: int, stop: int) -> tuple[RowChunk | None, bool]:
    """The chunk's rows (and rejects) within [start, stop), None if it has none; and whether it reached `stop`."""
    span = chunk.span
    if span is None:
        return None, False
    low, high = span
    if low >= start and high < stop:
        return chunk, False
    keep = np.flatnonzero((chunk.rows >= start) & (chunk.rows < stop))
    clipped = chunk.take(keep)
    clipped.rejects = [e for e in chunk.rejects if e.row is None or start <= e.row < stop]
    return (clipped if len(keep) or clipped.rejects else None), high >= stop


def read_unit(unit: WorkUnit, columns: Columns, chunk_rows: int) -> Iterator[RowChunk]:
    """The unit's rows in chunks. Readers that cannot seek to row_start (CSV, gzip, token shards, a piece's rows
    within a row group) read from where they can, and the rows outside the unit are dropped here."""
    reader = {"parquet": _read_parquet, "jsonl": _read_jsonl, "jsonl.gz": _read_jsonl,
              "text": _read_text, "csv": _read_csv, "tokens": _read_tokens}[unit.file.format]
    try:
        for chunk in reader(unit, columns, chunk_rows):
            chunk, past = clip_rows(chunk, unit.row_start, unit.row_stop)
            if chunk is not None:
                yield chunk
            if past:
                return
    except InputError:
        raise
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise InputError(unit.file.path, f"cannot read rows {unit.row_start}-{unit.row_stop - 1}: {_short(exc)}") \
            from None


def generated_id(unit: WorkUnit, row: int) -> str:
    return f"{unit.file.stem}:{row}"


# --- line formats -------------------------------------------------------------------------------------------

def _lines(unit: WorkUnit, chunk_rows: int) -> Iterator[tuple[int, list[bytes]]]:
    """Yield (first row, raw lines without newline) for the unit's rows."""
    if unit.file.format == "jsonl.gz":
        fh = location.open_input(unit.file.path, gzipped=True)
    else:
        fh = location.open_input(unit.file.path)
        fh.seek(unit.byte_start)
    with fh:
        row = unit.first_read_row
        while row < unit.row_start:         # a piece of a split unit: skip to its first row, undecoded
            if not fh.readline():
                return
            row += 1
        batch: list[bytes] = []
        for line in fh:
            if row + len(batch) >= unit.row_stop:
                break
            batch.append(line.rstrip(b"\n").removesuffix(b"\r"))
            if len(batch) == chunk_rows:
                yield row, batch
                row += len(batch)
                batch = []
        if batch:
            yield row, batch


def _decode(unit: WorkUnit, row: int, raw: bytes) -> str | InputError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return InputError(unit.file.path, f"invalid UTF-8 at byte {exc.start} of the line", row)


def _read_text(unit: WorkUnit, columns: Columns, chunk_rows: int) -> Iterator[RowChunk]:
    for first, lines in _lines(unit, chunk_rows):
        chunk = RowChunk(np.empty(0, np.int64), [], [])
        rows = []
        for k, raw in enumerate(lines):
            text = _decode(unit, first + k, raw)
            if isinstance(text, InputError):
                chunk.rejects.append(text)
                continue
            rows.append(first + k)
            chunk.ids.append(generated_id(unit, first + k))
            chunk.texts.append(text)
        chunk.rows = np.asarray(rows, dtype=np.int64)
        yield chunk


def _json_type(value: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: str) -> int | None:
    """The position of a lone surrogate in `value` (legal in JSON as an escape, but not Unicode text: nothing
    downstream can encode it), or None."""
    if value.isascii():
        return None
    found = _SURROGATE.search(value)
    return found.start() if found else None


def _read_jsonl(unit: WorkUnit, columns: Columns, chunk_rows: int) -> Iterator[RowChunk]:
    path = unit.file.path
    id_key = columns.id or "id"
    for first, lines in _lines(unit, chunk_rows):
        chunk = RowChunk(np.empty(0, np.int64), [], [])
        rows = []
        for k, raw in enumerate(lines):
            row = first + k
            line = _decode(unit, row, raw)
            if isinstance(line, InputError):
                chunk.rejects.append(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                what = "empty line" if not line.strip() else f"invalid JSON ({exc.msg} at column {exc.colno})"
                chunk.rejects.append(InputError(path, f"{what}; each line must be one JSON object", row))
                continue
            if not isinstance(obj, dict):
                chunk.rejects.append(InputError(path, f"line is {_json_type(obj)}, not a JSON object", row))
                continue
            if id_key in obj:
                row_id = obj[id_key]
                if row_id is None or isinstance(row_id, (dict, list, bool)):
                    chunk.rejects.append(InputError(path, f"id {id_key!r} is {_json_type(row_id)}", row))
                    continue
                row_id = str(row_id)
                at = lone_surrogate(row_id)
                if at is not None:
                    # The id cannot be written anywhere (not even to _rejects.jsonl): name it escaped.
                    chunk.rejects.append(InputError(path, f"id {row_id!r} holds a lone surrogate at character {at}"
                                                    ", which is not valid Unicode", row))
                    continue
            elif columns.id:
                chunk.rejects.append(InputError(path, f"no id key {id_key!r}", row))
                continue
            else:
                row_id = generated_id(unit, row)
            if columns.text not in obj:
                chunk.rejects.append(InputError(path, f"no text key {columns.text!r}", row, row_id))
                continue
            text = obj[columns.text]
            if not isinstance(text, str):
                chunk.rejects.append(InputError(path, f"text {columns.text!r} is {_json_type(text)}, not a string",
                                                row, row_id))
                continue
            at = lone_surrogate(text)
            if at is not None:
                chunk.rejects.append(InputError(path, f"text {columns.text!r} holds a lone surrogate "
                                                f"({text[at]!r}) at character {at}, which is not valid Unicode",
                                                row, row_id))
                continue
            rows.append(row)
            chunk.ids.append(row_id)
            chunk.texts.append(text)
        chunk.rows = np.asarray(rows, dtype=np.int64)
        yield chunk


# --- columnar formats ---------------------------------------------------------------------------------------

def _column_chunks(unit: WorkUnit, text_col: pa.Array, id_col: pa.Array | None, first: int) -> RowChunk:
    """Validate one columnar chunk: text must be non-null UTF-8 strings, ids non-null."""
    path = unit.file.path
    n = len(text_col)
    if pa.types.is_dictionary(text_col.type):
        text_col = text_col.dictionary_decode()
    texts: list = []
    if pa.types.is_binary(text_col.type) or pa.types.is_large_binary(text_col.type):
        try:
            texts = pc.cast(text_col, pa.large_string()).to_pylist()   # validates the whole chunk at once
        except pa.ArrowInvalid:
            texts = _decode_binary_rows(unit, text_col, first, "text")
    else:
        texts = text_col.to_pylist()
    if id_col is None:
        ids = [generated_id(unit, first + k) for k in range(n)]
    elif pa.types.is_binary(id_col.type) or pa.types.is_large_binary(id_col.type):
        ids = _decode_binary_rows(unit, id_col, first, "id")
    else:
        ids = id_col.to_pylist()
        ids = [None if v is None else v if isinstance(v, str) else str(v) for v in ids]
    chunk = RowChunk(np.empty(0, np.int64), [], [])
    rows = []
    for k in range(n):
        text, row_id = texts[k], ids[k]
        if row_id is None:
            chunk.rejects.append(InputError(path, "id is null", first + k))
        elif isinstance(row_id, InputError):
            chunk.rejects.append(row_id)
        elif isinstance(text, InputError):
            chunk.rejects.append(InputError(path, text.reason, first + k, row_id))
        elif text is None:
            chunk.rejects.append(InputError(path, "text is null", first + k, row_id))
        else:
            rows.append(first + k)
            chunk.ids.append(row_id)
            chunk.texts.append(text)
    chunk.rows = np.asarray(rows, dtype=np.int64)
    return chunk


def _decode_binary_rows(unit: WorkUnit, col: pa.Array, first: int, what: str) -> list:
    """Decode row by row, putting an InputError where a value is not UTF-8."""
    out: list = []
    for k, raw in enumerate(col.to_pylist()):
        try:
            out.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.append(InputError(unit.file.path, f"invalid UTF-8 at byte {exc.start} of the {what}", first + k))
    return out


def _pick_id_column(unit: WorkUnit, names: list[str], columns: Columns) -> str | None:
    if columns.id:
        if columns.id not in names:
            raise InputError(unit.file.path, f"no id column {columns.id!r} (columns: {', '.join(names)})")
        return columns.id
    return "id" if "id" in names and columns.text != "id" else None


def _read_parquet(unit: WorkUnit, columns: Columns, chunk_rows: int) -> Iterator[RowChunk]:
    pf = pq.ParquetFile(location.open_arrow(unit.file.path))
    schema = pf.schema_arrow
    if columns.text not in schema.names:
        raise InputError(unit.file.path, f"no text column {columns.text!r} (columns: {', '.join(schema.names)})")
    text_type = schema.field(columns.text).type
    value_type = text_type.value_type if pa.types.is_dictionary(text_type) else text_type
    if value_type not in STRING_TYPES:
        raise InputError(unit.file.path, f"text column {columns.text!r} has type {text_type}, expected string")
    id_name = _pick_id_column(unit, schema.names, columns)
    wanted = [columns.text] + ([id_name] if id_name else [])
    first, groups = unit.first_read_row, list(unit.row_groups)
    while len(groups) > 1 and first + pf.metadata.row_group(groups[0]).num_rows <= unit.row_start:
        first += pf.metadata.row_group(groups.pop(0)).num_rows      # a piece: its rows start in a later group
    for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=groups, columns=wanted,
                                 use_threads=False):
        yield _column_chunks(unit, batch.column(columns.text), batch.column(id_name) if id_name else None, first)
        first += batch.num_rows


def _read_csv(unit: WorkUnit, columns: Columns, chunk_rows: int) -> Iterator[RowChunk]:
    import pyarrow.csv as pcsv

    names = pcsv.open_csv(location.open_arrow(unit.file.path)).schema.names
    if columns.text not in names:
        raise InputError(unit.file.path, f"no text column {columns.text!r} (columns: {', '.join(names)})")
    id_name = _pick_id_column(unit, names, columns)
    wanted = [columns.text] + ([id_name] if id_name else [])
    # Text is read as binary so invalid UTF-8 is reported per row rather than failing the whole block.
    types = {columns.text: pa.binary(), **({id_name: pa.string()} if id_name else {})}
    convert = pcsv.ConvertOptions(include_columns=wanted, column_types=types,
                                  strings_can_be_null=False)
    reader = pcsv.open_csv(location.open_arrow(unit.file.path),
                           parse_options=pcsv.ParseOptions(newlines_in_values=True),
                           convert_options=convert, read_options=pcsv.ReadOptions(block_size=1 << 20))
    first = 0
    for batch in reader:
        for start in range(0, batch.num_rows, chunk_rows):
            part = batch.slice(start, chunk_rows)
            yield _column_chunks(unit, part.column(columns.text), part.column(id_name) if id_name else None,
                                 first + start)
        first += batch.num_rows


def _read_tokens(unit: WorkUnit, columns: Columns, chunk_rows: int) -> Iterator[RowChunk]:
    """A shard of a token directory (io/tokens.py): ids and token ids, already validated and truncated."""
    with pa.memory_map(unit.file.path) as source:
        reader = pa.ipc.open_file(source)
        schema = reader.schema
        if schema.names[:2] != ["id", "input_ids"] or schema.field("input_ids").type != pa.list_(pa.int32()):
            raise InputError(unit.file.path, f"not an hpcembed token shard: columns {schema}, expected "
                                             "id (string) and input_ids (list<int32>)")
        first = 0
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            for start in range(0, batch.num_rows, chunk_rows):
                part = batch.slice(start, chunk_rows)
                ids = part.column(0).to_pylist()
                bad = {k: "id is null" for k, i in enumerate(ids) if i is None}
                for k, why in _token_row_problems(part.column(1), columns.token_limits).items():
                    bad.setdefault(k, why)
                good = np.asarray([k for k in range(len(ids)) if k not in bad], dtype=np.int64)
                chunk = RowChunk(first + start + good, [ids[k] for k in good], [],
                                 [InputError(unit.file.path, why, first + start + k, ids[k])
                                  for k, why in sorted(bad.items())],
                                 part.column(1).take(numeric(good, pa.int64())) if bad else part.column(1))
                yield chunk
            first += batch.num_rows


def _token_row_problems(tokens: pa.ListArray, limits: tuple[int, int] | None) -> dict[int, str]:
    """Rows of a token shard that no encoder may take: null or empty, longer than the model's maximum, or holding
    an id outside its vocabulary (each would be an internal error or a meaningless embedding downstream)."""
    offsets = tokens.offsets.to_numpy()
    lengths = np.diff(offsets)
    nulls = tokens.is_null().to_numpy(zero_copy_only=False)
    bad = {int(k): "input_ids is null" for k in np.flatnonzero(nulls)}
    bad.update((int(k), "input_ids is empty: no tokens to embed") for k in np.flatnonzero((lengths == 0) & ~nulls))
    if limits is None:
        return bad
    max_len, vocab = limits
    for k in np.flatnonzero(lengths > max_len):
        bad.setdefault(int(k), f"{lengths[k]} tokens, more than the model's maximum of {max_len}")
    values = tokens.values.to_numpy()[offsets[0]: offsets[-1]]
    outside = np.flatnonzero((values < 0) | (values >= vocab))
    for position in outside:
        k = int(np.searchsorted(offsets[1:] - offsets[0], position, side="right"))
        bad.setdefault(k, f"token id {values[position]} is outside the model's vocabulary (0 to {vocab - 1})")
    return bad
