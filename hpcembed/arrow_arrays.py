"""Arrow arrays built over numpy buffers and Python strings without `pa.array`.

pyarrow's `pa.array` imports pandas on its first call wherever pandas is installed (0.27 s on the H100 box, 0.46 s
in a venv on the CPU box). An encoder rank has no other use for pandas, and its first `pa.array` came in the
warm-up batches of its build, on the path to the job's first batch. The arrays here are built from buffers, so
the encoder rank never imports pandas; numeric ones share the numpy array's memory.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def numeric(values: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """A one-dimensional numeric numpy array as an Arrow array of the same values (no nulls), sharing its memory
    where it is contiguous. `type`: the Arrow type wanted, else the array's own; the values are cast to it in numpy
    first."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"an Arrow array needs one dimension, got shape {values.shape}")
    type = type or pa.from_numpy_dtype(values.dtype)
    values = np.ascontiguousarray(values, dtype=type.to_pandas_dtype())
    return pa.Array.from_buffers(type, len(values), [None, pa.py_buffer(values)])


def strings(values: list[str]) -> pa.StringArray:
    """Python strings as an Arrow string array (UTF-8, no nulls)."""
    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"{offsets[-1]} bytes of strings do not fit one Arrow string array (2 GiB at most)")
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets.astype(np.int32)),
                                       pa.py_buffer(b"".join(encoded)))
