"""Arrow arrays built from buffers (hpcembed/arrow_arrays.py) equal what pa.array builds, and the encoder rank's
path (a token batch built, taken from and turned to Arrow; shards written with chunks, digests and every output
dtype) never imports pandas, as pa.array does on its first call wherever pandas is installed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from hpcembed.arrow_arrays import numeric, strings


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.float32, np.int8, np.uint8])
def test_numeric_equals_pa_array(dtype):
    values = (np.arange(-5, 20) % 120).astype(dtype)
    assert numeric(values).equals(pa.array(values))
    strided = values[::3]
    assert numeric(strided).equals(pa.array(strided))


def test_numeric_casts_to_a_named_type_and_refuses_two_dimensions():
    values = np.arange(6, dtype=np.int64)
    assert numeric(values, pa.int32()).equals(pa.array(values.astype(np.int32)))
    assert numeric([3, 1, 2], pa.int64()).to_pylist() == [3, 1, 2]
    with pytest.raises(ValueError, match="one dimension"):
        numeric(values.reshape(2, 3))


def test_strings_equal_pa_array():
    values = ["", "a", "é", "日本語", "emoji 🙂", "\u202eRTL", "x" * 1000]
    assert strings(values).equals(pa.array(values, type=pa.string()))
    assert strings([]).equals(pa.array([], type=pa.string()))


# Stands in for an installed pandas: the real one may be absent, and what is checked is whether it is imported.
FAKE_PANDAS = "import os\nopen(os.environ['PANDAS_IMPORTED_MARK'], 'w').close()\nraise ImportError('not here')\n"

ENCODER_PATH = """
    import os
    import numpy as np
    from hpcembed.io.writer import OutputDir
    from hpcembed.tokenize.batch import TokenBatch
    batch = TokenBatch.build([[101, 7, 102], [101, 102], [101, 5, 6, 102]], ["a", "é", "c"], np.arange(3), 4)
    part = batch.take(np.array([2, 0]))
    part.to_arrow()
    embeddings = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    chunks = np.array([[0, 0, 5], [1, 5, 9]], dtype=np.int64)
    digests = np.zeros((2, 16), dtype=np.uint8)
    ranges = np.stack([embeddings.min(0), embeddings.max(0)])
    for dtype in ("float32", "float16", "int8", "uint8", "binary"):
        os.makedirs(f"{OUT}/{dtype}")
        out = OutputDir(f"{OUT}/{dtype}", output_dtype=dtype, ranges=ranges)
        out.write_shard("part-00000004-r00001.parquet", part.id_array(), embeddings, chunks, digests)
"""


def test_the_encoder_ranks_path_never_imports_pandas(tmp_path):
    fake = tmp_path / "site" / "pandas"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_PANDAS)
    mark = tmp_path / "pandas-imported"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
               PANDAS_IMPORTED_MARK=str(mark))
    script = f"OUT = {str(tmp_path / 'out')!r}\n" + textwrap.dedent(ENCODER_PATH)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out").rglob("*.parquet"))) == 5
    assert not mark.exists(), "pandas was imported on the encoder rank's path"
    # The check can fail: pa.array imports pandas where it can.
    probe = subprocess.run([sys.executable, "-c", "import pyarrow as pa; pa.array([1, 2])"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert mark.exists()
