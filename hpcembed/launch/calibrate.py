"""Calibration of int8 and uint8 output (--output-dtype int8|uint8): each dimension's minimum and maximum over the
embeddings of --calibration-rows rows of the job's own input, the ranges sentence-transformers' quantize_embeddings
takes.

The rows are the first rows of up to 16 work units spread evenly over the plan (a few files' worth, not only the
first file's head), tokenized as the job tokenizes (windows under --chunk-tokens) and embedded by the encoder rank's
own first encoder. Every encoder rank embeds the same rows in the same batches, and the ranks then take the
minimum of minima and maximum of maxima, so all of them store with one range, bit for bit. The conductor records
the ranges in the ledger before any shard quantized with them is committed, and a resumed job uses the ranges
recorded instead of calibrating again, so an output never mixes two ranges.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from ..batching import BatchAssembler
from ..engine.pooling import mean_of_windows
from ..errors import InputError
from ..io.readers import Columns, read_unit
from ..io.sources import WorkUnit
from ..tokenize.chunk import tokenize_chunk

log = logging.getLogger("hpcembed")

SPREAD_UNITS = 16


def calibration_units(units: list[WorkUnit], rows: int) -> list[tuple[WorkUnit, int]]:
    """(unit, rows to take from its start) for up to SPREAD_UNITS units spread evenly over `units`."""
    if not units:
        return []
    count = min(SPREAD_UNITS, len(units))
    picked = [units[k * len(units) // count] for k in range(count)]
    each = math.ceil(rows / count)
    return [(unit, min(each, unit.rows)) for unit in picked]


def sample_batches(units: list[tuple[WorkUnit, int]], columns: Columns, backend, batch_tokens: int,
                   purpose: str) -> list:
    """Token batches of those rows, tokenized as the job tokenizes them (windows under --chunk-tokens). Rows that
    are not valid input are left out; a unit that cannot be read is skipped, its error is the job's to report."""
    assembler = BatchAssembler(batch_tokens)
    batches = []
    for unit, rows in units:
        try:
            chunk = next(read_unit(unit, columns, rows), None)
        except InputError:
            continue
        if chunk is not None and chunk.ids:
            batches += assembler.add(tokenize_chunk(backend, chunk, unit.unit))
    rest = assembler.flush()
    batches += [rest] if rest is not None else []
    if not batches:
        raise InputError(units[0][0].file.path if units else "input", f"no valid rows to {purpose} on")
    return batches


def calibrate(units: list[tuple[WorkUnit, int]], columns: Columns, backend, encoder, batch_tokens: int,
              pool_windows: bool = False, normalize: bool = False) -> np.ndarray:
    """Ranges [2, dim] float32 from the embeddings of those rows, as they will be stored (`pool_windows`: a
    chunked text's windows averaged, as --chunk-pooling mean stores them)."""
    start = time.perf_counter()
    batches = sample_batches(units, columns, backend, batch_tokens, "calibrate int8 output")
    stored = []
    for batch in batches:           # a text's windows are in one batch (BatchAssembler)
        embeddings = encoder.encode(batch)
        stored.append(mean_of_windows(embeddings, batch.chunks[:, 0], normalize)[1]
                      if pool_windows and batch.chunks is not None else embeddings)
    embeddings = np.concatenate(stored)
    log.debug("calibrated on %d embeddings in %.1f s", len(embeddings), time.perf_counter() - start)
    return np.vstack((embeddings.min(axis=0), embeddings.max(axis=0))).astype(np.float32)


def agree(ranges: np.ndarray, comm) -> np.ndarray:
    """The encoder ranks' common ranges: the minimum of minima, the maximum of maxima (collective over `comm`)."""
    from mpi4py import MPI
    out = np.empty_like(ranges)
    comm.Allreduce(np.ascontiguousarray(ranges[0]), out[0], op=MPI.MIN)
    comm.Allreduce(np.ascontiguousarray(ranges[1]), out[1], op=MPI.MAX)
    return out
