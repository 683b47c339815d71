"""--output-dtype: how embeddings are stored, each as sentence-transformers' quantize_embeddings stores it."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

# --output-dtype: how embeddings are stored, each as sentence-transformers' quantize_embeddings stores it. binary
# and ubinary are the signs packed 8 to a byte (binary: the packed byte minus 128, as int8); int8 and uint8 are
# 256 buckets per dimension between the calibration ranges (launch/calibrate.py).
OUTPUT_DTYPES = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
                 "binary": pa.int8(), "ubinary": pa.uint8()}
CALIBRATED = ("int8", "uint8")


def stored_width(dim: int, dtype: str) -> int:
    """Values per stored embedding: the dimension, or its bytes of packed signs."""
    return (dim + 7) // 8 if dtype.endswith("binary") else dim


def convert(embeddings: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """float32 embeddings [rows, dim] as `dtype` stores them; `ranges` [2, dim]: each dimension's minimum and
    maximum, for int8 and uint8 (the same arithmetic as quantize_embeddings, so the same bytes)."""
    if dtype == "float16":
        return embeddings.astype(np.float16)
    if dtype == "binary":
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    if dtype == "ubinary":
        return np.packbits(embeddings > 0, axis=-1)
    if dtype in CALIBRATED:
        if ranges is None:
            raise ValueError(f"{dtype} output needs calibration ranges")
        ranges = np.asarray(ranges, np.float32)
        starts = ranges[0]
        steps = (ranges[1] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets = np.clip(np.floor((np.asarray(embeddings, np.float32) - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if dtype == "uint8" else (buckets - 128).astype(np.int8)
    return np.ascontiguousarray(embeddings, dtype=np.float32)
