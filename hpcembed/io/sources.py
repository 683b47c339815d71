"""Resolve --input into files, and cut them into work units the conductor can hand out.

A work unit is a row range of one file. Parquet units follow row groups (a row group is the smallest range
Parquet can read without decoding its neighbours). Plain .jsonl and .txt files are indexed by a newline scan,
so units can seek straight to their first byte. Gzipped JSONL and CSV cannot be split safely without decoding
from the start (CSV values may hold quoted newlines), so each such file is one unit: shard them upstream.
A token directory (io/tokens.py, `hpcembed tokenize`) given as input stands for its shards, one unit each.

Near the end of a job a unit being read may be split at a row boundary (tail stealing, protocol/stealing.py): its
reader keeps the rows before the cut, and the rest becomes a piece, a unit of its own numbered by where it
starts (piece_number), which reads from the same place in the file as the unit it came from and skips to its
first row. The ledger records each split, and a resumed job applies them to its plan (Plan.split).
"""
from __future__ import annotations

import glob
import gzip
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..errors import ConfigError, InputError
from . import location

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz", ".csv": "csv", ".txt": "text", ".text": "text"}
SCAN_BLOCK = 16 << 20
PIECE_ROWS = 1 << 40        # a piece's number: (its file's index + 1) * PIECE_ROWS + its first row


def _strip_format(name: str) -> str:
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class InputFile:
    index: int
    path: str
    format: str
    id_prefix: str = ""         # generated ids are '<id_prefix>:<row>' (resolve_inputs makes them unique)

    @property
    def stem(self) -> str:
        return self.id_prefix or _strip_format(os.path.basename(location.display(self.path)))


@dataclass(frozen=True)
class WorkUnit:
    """Rows [row_start, row_stop) of one input file. byte_start lets line formats seek directly, to the row
    `seek_row` (-1: row_start); a piece of a split unit seeks where the unit did and skips to its own rows."""

    unit: int
    file: InputFile
    row_start: int
    row_stop: int
    byte_start: int = 0
    row_groups: tuple[int, ...] = ()
    seek_row: int = -1

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    def __reduce__(self):
        # Its fields as a tuple, which pickles faster than a frozen dataclass's default: rank 0 pickles blocks of
        # units in its grants to sub-conductors.
        return WorkUnit, (self.unit, self.file, self.row_start, self.row_stop, self.byte_start, self.row_groups,
                          self.seek_row)

    @property
    def first_read_row(self) -> int:
        """The row that byte_start (or the first of row_groups) is the start of."""
        return self.row_start if self.seek_row < 0 else self.seek_row


def piece_number(unit: WorkUnit, cut: int) -> int:
    """The number of the piece of `unit` from row `cut` on: the same wherever and however often the unit is split,
    and unlike any planned unit's or any other piece's."""
    return (unit.file.index + 1) * PIECE_ROWS + cut


def split_unit(unit: WorkUnit, cut: int) -> tuple[WorkUnit, WorkUnit]:
    """`unit` as its rows before `cut`, and the piece from `cut` on."""
    if not unit.row_start < cut < unit.row_stop:
        raise ValueError(f"cannot split unit {unit.unit} (rows {unit.row_start}-{unit.row_stop - 1}) at row {cut}")
    # Copies of the unit's fields with two changed, not the constructor (a frozen dataclass sets each field through
    # object.__setattr__: 1.3 µs a unit) nor dataclasses.replace (slower still): rank 0 applies every split of a
    # big job, and at 1000 nodes they are most of its time in the tail (bench/notes/scale_out.md, session 13).
    fields = unit.__dict__
    head, piece = object.__new__(WorkUnit), object.__new__(WorkUnit)
    head.__dict__.update(fields)
    head.__dict__["row_stop"] = cut
    piece.__dict__.update(fields)
    piece.__dict__.update(unit=piece_number(unit, cut), row_start=cut, seek_row=unit.first_read_row)
    return head, piece


@dataclass
class Plan:
    files: list[InputFile]
    file_rows: dict[int, int]
    units: list[WorkUnit]
    unreadable: list[InputError]   # files skipped under --on-invalid skip
    _index: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)   # unit -> position
    _planned: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Made with the plan, not at the first split: that one comes from a job's busiest rank mid-run (at 1000
        # nodes, a Python pass over ~400k units at rank 0; bench/notes/scale_out.md, session 12).
        self._planned = [u.rows for u in self.units]
        self._index = {u.unit: k for k, u in enumerate(self.units)}

    @property
    def total_rows(self) -> int:
        return sum(self.file_rows.values())

    @property
    def planned_sizes(self) -> list[int]:
        """Each unit's rows as planned, before any split (what a scaling replay plans)."""
        return self._planned or [u.rows for u in self.units]

    @property
    def splits(self) -> int:
        return len(self.units) - len(self.planned_sizes)

    def split(self, number: int, cut: int) -> tuple[WorkUnit, WorkUnit]:
        """Split unit `number` at row `cut` (a split the ledger recorded, or one made now): the unit keeps the rows
        before it, and the piece, added to the plan, has the rest. Both are returned."""
        index = self._index
        if len(index) != len(self.units):
            index = self._index = {u.unit: k for k, u in enumerate(self.units)}
        if number not in index:
            raise ValueError(f"no unit {number} in the plan to split")
        head, piece = split_unit(self.units[index[number]], cut)
        self.units[index[number]] = head
        index[piece.unit] = len(self.units)
        self.units.append(piece)
        return head, piece


def format_of(path: str) -> str | None:
    lower = path.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(ext):
            return FORMATS[ext]
    return None


def resolve_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand files, directories (recursively, known extensions only) and globs, in a stable order."""
    from .tokens import read_token_manifest, token_directory_files
    paths: list[str] = []
    token_files: set[str] = set()
    under: dict[str, str] = {}          # a file found in a directory input -> that directory
    for pattern in patterns:
        if location.is_url(pattern):
            found = _resolve_url(pattern)
            paths.extend(found)
            under.update((p, pattern) for p in found if p != pattern)
            continue
        manifest = read_token_manifest(pattern) if os.path.isdir(pattern) else None
        if manifest is not None:
            found = token_directory_files(pattern, manifest)
            token_files.update(found)
            paths.extend(found)
        elif os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and format_of(str(p))
                           and not p.name.startswith(("_", ".")))
            if not found:
                raise ConfigError(f"input directory {pattern} holds no Parquet, JSONL, CSV or text files")
            paths.extend(found)
            under.update((os.path.abspath(p), os.path.abspath(pattern)) for p in found)
        elif os.path.exists(pattern):
            if not os.path.isfile(pattern):
                # A FIFO or device would block the planner's line count forever, silently.
                raise ConfigError(f"input {pattern} is not a regular file ({_file_kind(pattern)}); give files, "
                                  "directories or globs")
            paths.append(pattern)
        else:
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ConfigError(f"input {pattern} does not exist and matches no files")
            paths.extend(matches)
    files, seen = [], set()
    for path in paths:
        url = location.is_url(path)
        real = path if url else os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        fmt = "tokens" if path in token_files else format_of(location.display(path))
        if fmt is None:
            raise ConfigError(f"input {path}: unknown format; expected one of {', '.join(sorted(FORMATS))}")
        files.append(InputFile(len(files), path if url else os.path.abspath(path), fmt))
    return _with_id_prefixes(files, under)


def _resolve_url(pattern: str) -> list[str]:
    """A URL input: one file, or every file of a known format under a directory (a prefix of an object store)."""
    try:
        if location.is_dir(pattern):
            found = [u for u in location.list_files(pattern) if format_of(location.display(u))
                     and not os.path.basename(location.display(u)).startswith(("_", "."))]
            if not found:
                raise ConfigError(f"input {pattern} holds no Parquet, JSONL, CSV or text files")
            return found
        if location.exists(pattern):
            return [pattern]
    except OSError as exc:
        raise ConfigError(f"input {pattern} cannot be listed: {_short(exc)}") from None
    raise ConfigError(f"input {pattern} does not exist (URLs take no globs: give a file or a directory)")


def _with_id_prefixes(files: list[InputFile], under: dict[str, str]) -> list[InputFile]:
    """Each file's prefix for generated ids: its path within the directory input it was found in (a file given
    by name: its name), without the format's extension. Files that would still share a prefix (same-named files
    of two inputs) take their paths from the deepest directory the colliding files have in common, so no two
    files of a job can give the same id."""
    def plain(path: str) -> str:
        """A URL as a path (its query and scheme dropped), so path arithmetic applies."""
        return location.display(path).split("://", 1)[1] if location.is_url(path) else path

    def relative(f: InputFile) -> str:
        directory = under.get(f.path)
        return os.path.relpath(plain(f.path), plain(directory)) if directory else os.path.basename(plain(f.path))
    prefixes = [_strip_format(relative(f)) for f in files]
    groups: dict[str, list[int]] = {}
    for k, prefix in enumerate(prefixes):
        groups.setdefault(prefix, []).append(k)
    for members in groups.values():
        if len(members) > 1:
            common = os.path.commonpath([os.path.dirname(plain(files[k].path)) for k in members])
            for k in members:
                prefixes[k] = _strip_format(os.path.relpath(plain(files[k].path), common))
    return [InputFile(f.index, f.path, f.format, prefix) for f, prefix in zip(files, prefixes)]


def _file_kind(path: str) -> str:
    mode = os.stat(path).st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"


def check_output_outside_inputs(output: str, files: list[InputFile], patterns: list[str]) -> None:
    """The output must never feed back into the input: refuse an output directory that is an input directory,
    lies inside one, or holds an input file."""
    if location.is_url(output):
        out = location.display(output).rstrip("/")
        for pattern in patterns:
            root = location.display(pattern).rstrip("/")
            if location.is_url(pattern) and (out == root or out.startswith(root + "/")):
                raise ConfigError(f"output {output} is inside input {pattern}: the next run would read its own "
                                  "shards as input; choose an output outside it")
        for f in files:
            if location.display(f.path).startswith(out + "/"):
                raise ConfigError(f"input {f.path} lies inside the output {output}; choose another output")
        return
    out = os.path.realpath(output)
    for pattern in patterns:
        if not location.is_url(pattern) and os.path.isdir(pattern):
            root = os.path.realpath(pattern)
            if out == root or out.startswith(root + os.sep):
                raise ConfigError(f"output {output} is inside input directory {pattern}: the next run would read "
                                  "its own shards as input; choose an output outside it")
    for f in files:
        if not location.is_url(f.path) and os.path.realpath(f.path).startswith(out + os.sep):
            raise ConfigError(f"input {f.path} lies inside the output directory {output}; choose another output")


def _line_starts(path: str, every: int) -> tuple[int, list[int]]:
    """Count the lines of a file and return the byte offset of every `every`-th line start (0 included)."""
    starts, rows, pos, last_byte = [0], 0, 0, b"\n"
    next_cut = every
    with location.open_input(path) as fh:
        while block := fh.read(SCAN_BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            # Line k starts right after newline k-1; record the starts that are unit boundaries.
            while next_cut <= rows + len(newlines):
                starts.append(pos + int(newlines[next_cut - rows - 1]) + 1)
                next_cut += every
            rows += len(newlines)
            pos += len(block)
            last_byte = block[-1:]
    if pos and last_byte != b"\n":
        rows += 1           # a last line without its newline is still a row
    if starts[-1] >= pos and len(starts) > 1:
        starts.pop()        # a boundary exactly at end of file starts no unit
    return rows, starts


def _count_gzip_lines(path: str) -> int:
    rows, last = 0, b"\n"
    with location.open_input(path, gzipped=True) as fh:
        while block := fh.read(SCAN_BLOCK):
            rows += block.count(b"\n")
            last = block[-1:]
    return rows + (last != b"\n")


def _count_csv_rows(path: str) -> int:
    import pyarrow.csv as pcsv
    # All columns read as binary so the count never fails on a value; validation happens when the unit is read.
    names = pcsv.open_csv(location.open_arrow(path)).schema.names
    opts = pcsv.ConvertOptions(column_types={n: "binary" for n in names})
    reader = pcsv.open_csv(location.open_arrow(path), parse_options=pcsv.ParseOptions(newlines_in_values=True),
                           convert_options=opts)
    return sum(b.num_rows for b in reader)


def plan_file(f: InputFile, unit_rows: int, first_unit: int) -> tuple[int, list[WorkUnit]]:
    units: list[WorkUnit] = []
    if f.format == "parquet":
        meta = pq.ParquetFile(location.open_arrow(f.path)).metadata
        start, groups, rows_in = 0, [], 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows_in += meta.row_group(g).num_rows
            if rows_in >= unit_rows or g == meta.num_row_groups - 1:
                units.append(WorkUnit(first_unit + len(units), f, start, start + rows_in, row_groups=tuple(groups)))
                start, groups, rows_in = start + rows_in, [], 0
        return meta.num_rows, [u for u in units if u.rows]
    if f.format in ("jsonl", "text"):
        rows, starts = _line_starts(f.path, unit_rows)
        for k, b in enumerate(starts):
            stop_row = min((k + 1) * unit_rows, rows)
            if k * unit_rows >= rows:
                break
            units.append(WorkUnit(first_unit + len(units), f, k * unit_rows, stop_row, b))
        return rows, units
    if f.format == "tokens":
        from .tokens import token_shard_rows
        rows = token_shard_rows(f.path)      # a token shard holds one unit of the job that made it
    else:
        rows = _count_gzip_lines(f.path) if f.format == "jsonl.gz" else _count_csv_rows(f.path)
    return rows, ([WorkUnit(first_unit, f, 0, rows)] if rows else [])


def plan_job(files: list[InputFile], unit_rows: int, skip_unreadable: bool) -> Plan:
    file_rows: dict[int, int] = {}
    units: list[WorkUnit] = []
    unreadable: list[InputError] = []
    for f in files:
        try:
            rows, file_units = plan_file(f, unit_rows, len(units))
        except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
            # pyarrow's ArrowInvalid/ArrowIOError derive from ValueError/OSError.
            err = InputError(f.path, f"cannot read {f.format} file: {_short(exc)}")
            if not skip_unreadable:
                raise err from None
            unreadable.append(err)
            continue
        file_rows[f.index] = rows
        units.extend(file_units)
    return Plan(files, file_rows, units, unreadable)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
