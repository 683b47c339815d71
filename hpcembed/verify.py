"""`hpcembed verify OUTPUT`: check an embedding output directory before loading it into a vector store.

It reads the ledger and the manifest and opens every shard. These are problems:
- the job is not complete (no `_SUCCESS`);
- a committed shard is missing, has another size, rows or checksum than the ledger recorded, or cannot be read
  (the checks a rerun makes, io/writer.py);
- a shard-named file that the ledger does not name (a dataset reader would read it with the output);
- an id held twice, across every shard in the directory (in a chunked output, an id and window number);
- an embedding of another dimension than the manifest's, a value that is not finite, or, for a model that
  normalizes, a row whose norm is not 1;
- rows that do not add up to the manifest's;
- with `--input` (the job's inputs): an input row whose id is in neither the output nor `_rejects.jsonl`, or an
  id in the output that no input row has.
Ids are compared by their 128-bit digests (16 bytes a row in memory).
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError
from .io.ids import id_digest
from .io.ledger import LEDGER
from .io import location, npy
from .io.quantize import CALIBRATED, OUTPUT_DTYPES, stored_width
from .io.writer import REJECTS, SUCCESS, OutputDir, shard_ids

NORM_TOLERANCE = 1e-3          # float16 storage rounds norms by about 3e-4


def verify(path: str, inputs: list[str] | None = None) -> tuple[list[str], dict]:
    """(problems, summary) of the output directory `path`; raises ConfigError if it is not one. `inputs`: the
    job's --input, to check the output's ids against (check_against_input)."""
    output = OutputDir(path)
    ledger = output.ledger()
    if not output.dir.is_dir() or not ledger.exists():
        raise ConfigError(f"{path} is not an hpcembed output directory (no {LEDGER})")
    manifest = output.read_manifest() if output.has_manifest() else {}
    if manifest.get("kind") == "tokens":
        raise ConfigError(f"{path} is a token directory; verify checks embedding outputs")
    state = ledger.load()
    problems = [] if output.complete() else [f"no {SUCCESS}: the job is not complete"]
    damaged = output.damaged(state)
    problems += [f"unit {unit}: {why}" for unit, why in sorted(damaged.items())]
    committed = {name: unit for unit, record in state.units.items() for name in record.shards}
    names = output.dir.names()
    present = [n for n in names if n.startswith("part-") and n.endswith(".parquet")]
    problems += [f"shard {name} is not in the ledger: a reader of the directory would take its rows as output"
                 for name in present if name not in committed]
    problems += [f"{n} is no committed shard's embeddings" for n in names
                 if n.startswith("part-") and n.endswith(".npy") and n[:-4] + ".parquet" not in committed]
    readable = [name for name in present if committed.get(name) not in damaged]
    rows, digests, owners = 0, [], []
    for k, name in enumerate(readable):
        table = pq.read_table(location.open_arrow(output.file(name)))
        rows += table.num_rows
        problems += _check_embeddings(name, _embeddings(output.file(npy.companion(name)), table, manifest), manifest)
        keys = table.column("id").to_pylist()
        if "chunk" in table.column_names:   # a chunked output holds each (id, window) once
            keys = [f"{i}\x00{c}" for i, c in zip(keys, table.column("chunk").to_pylist())]
        digests.append(np.frombuffer(b"".join(id_digest(k) for k in keys), "V16"))
        owners.append(np.full(table.num_rows, k, np.int32))
    problems += _duplicates(np.concatenate(digests) if digests else np.empty(0, "V16"),
                            np.concatenate(owners) if owners else np.empty(0, np.int32), readable)
    expected = manifest.get("output_rows", manifest.get("rows_written"))
    if manifest and not damaged and rows != expected:
        problems.append(f"the shards hold {rows:,} rows, the manifest says {expected:,}")
    if inputs:
        problems += check_against_input(output, readable, manifest, inputs)
    summary = {"output": output.location, "shards": len(present), "rows": rows, "dim": manifest.get("dim"),
               "units": len(state.units), "problems": len(problems)}
    return problems, summary


def check_against_input(output: OutputDir, shards: list[str], manifest: dict, patterns: list[str]) -> list[str]:
    """Every valid row of the inputs has its id in the output or in _rejects.jsonl, and the output holds no id
    that is not in the inputs. `patterns` must be the job's --input: generated ids name a file by its path within
    the input it was found in. Ids are compared by digest (16 bytes each in memory)."""
    from .errors import InputError
    from .io.readers import Columns, read_unit
    from .io.sources import plan_job, resolve_inputs
    written = {id_digest(i) for name in shards for i in shard_ids(output.file(name))}
    rejected = {id_digest(r["id"]) for r in output.read_rejects() if r.get("id") is not None}
    plan = plan_job(resolve_inputs(patterns), manifest.get("settings", {}).get("unit_rows", 50_000), True)
    columns = Columns(manifest.get("text_column") or "text", manifest.get("id_column") or "")
    seen: set[bytes] = set()
    missing, example = 0, None
    for unit in plan.units:
        try:
            for chunk in read_unit(unit, columns, 8192):
                for row_id in chunk.ids:
                    key = id_digest(row_id)
                    seen.add(key)
                    if key not in written and key not in rejected:
                        missing += 1
                        example = example or row_id
        except InputError:
            continue                # a file the job could not read either: its rows are the job's rejects
    problems = [f"{missing:,} ids of the input are in neither the output nor {REJECTS}, e.g. {example!r}"] \
        if missing else []
    extra = written - seen
    if extra:
        first = next(i for name in shards for i in shard_ids(output.file(name)) if id_digest(i) in extra)
        problems.append(f"{len(extra):,} ids of the output are not in the input, e.g. {first!r}")
    return problems


def _embeddings(companion: str, table: pa.Table, manifest: dict) -> pa.Table:
    """The shard's ids and embeddings as one table: from its `.npy` (`companion`) in an npy output."""
    if manifest.get("output_format") != "npy":
        return table
    try:
        array = np.asarray(npy.read(companion))
    except (OSError, ValueError):
        return table                # damaged() names it
    values = pa.array(array.reshape(-1))
    if len(array) != table.num_rows or array.ndim != 2:
        return table.append_column("embedding", pa.array([None] * table.num_rows, pa.float32()))
    return table.append_column("embedding", pa.FixedSizeListArray.from_arrays(values, array.shape[1]))


def _check_embeddings(name: str, table: pa.Table, manifest: dict) -> list[str]:
    out = [f"shard {name}: {table.column('id').null_count} null ids"] if table.column("id").null_count else []
    if "embedding" not in table.column_names:
        return out + [f"shard {name}: no embeddings"]
    kind = table.schema.field("embedding").type
    dim, dtype = manifest.get("dim"), manifest.get("output_dtype", "float32")
    width = stored_width(dim, dtype) if dim else None
    if not pa.types.is_fixed_size_list(kind) or (width and kind.list_size != width) or \
            (dim and kind.value_type != OUTPUT_DTYPES[dtype]):
        return out + [f"shard {name}: embeddings are {kind}, the manifest says {dim} dimensions as {dtype}"]
    if dtype.endswith("binary") or dtype in CALIBRATED:
        return out                  # packed signs or buckets: any byte is valid
    values = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(table.num_rows, kind.list_size)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        out.append(f"shard {name} row {int(np.flatnonzero(~finite)[0])}: a value that is not finite "
                   f"({int((~finite).sum())} rows)")
    if manifest.get("normalize"):
        norms = np.linalg.norm(values.astype(np.float64), axis=1)
        off = np.flatnonzero(finite & (np.abs(norms - 1.0) > NORM_TOLERANCE))
        if len(off):
            out.append(f"shard {name} row {int(off[0])}: norm {norms[off[0]]:.4f}, the model normalizes "
                       f"({len(off)} rows)")
    return out


def _duplicates(digests: np.ndarray, owners: np.ndarray, names: list[str]) -> list[str]:
    if not len(digests):
        return []
    order = np.argsort(digests.view(np.dtype([("hi", "<u8"), ("lo", "<u8")])), order=("hi", "lo"), kind="stable")
    ordered = digests[order]
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not len(repeated):
        return []
    first = repeated[0]
    where = sorted({names[owners[order[first]]], names[owners[order[first + 1]]]})
    return [f"{len(repeated)} ids are held twice, e.g. in {' and '.join(where)}"]


def print_report(problems: list[str], summary: dict, out) -> None:
    dim = f", dim {summary['dim']}" if summary.get("dim") else ""
    print(f"hpcembed: verify {summary['output']}: {summary['shards']} shards, {summary['rows']:,} rows{dim}, "
          f"{summary['units']} committed units", file=out)
    for problem in problems:
        print(f"hpcembed: problem: {problem}", file=out)
    print(f"hpcembed: {'OK' if not problems else f'{len(problems)} problems'}", file=out)

