"""Output types (--output-dtype): each stores what sentence-transformers' quantize_embeddings makes of the same
float embeddings; int8 and uint8 with ranges calibrated on the job's own embeddings, agreed by every encoder rank,
recorded in the ledger and the manifest, and kept by a resumed job."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
from sentence_transformers.util.quantization import quantize_embeddings

from .conftest import mpirun, needs_mpi, read_manifest, run_cli, write_jsonl


def _stored(out) -> np.ndarray:
    table = ds.dataset(str(out), format="parquet").to_table().sort_by("id")
    width = table.schema.field("embedding").type.list_size
    return table["embedding"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, width)


def _corpus(path, rows: int):
    return write_jsonl(path, [{"id": f"q{k:03d}", "text": f"quantized row {k} " * (1 + k % 3)} for k in range(rows)])


def test_output_dtypes_match_sentence_transformers_quantization(tmp_path):
    src = _corpus(tmp_path / "rows.jsonl", 40)
    stored = {}
    for dtype in ("float32", "float16", "binary", "ubinary", "int8", "uint8"):
        out = tmp_path / dtype
        # --calibration-rows 40: calibrated on every row, as quantize_embeddings calibrates on what it is given.
        proc = run_cli("run", "--input", str(src), "--output", str(out), "--output-dtype", dtype, "--progress", "off",
                       "--calibration-rows", "40")
        assert proc.returncode == 0, proc.stderr[-2000:]
        stored[dtype] = _stored(out)
        manifest = read_manifest(out)
        assert manifest["output_dtype"] == dtype and ("int8_ranges" in manifest) == dtype.endswith("int8")
        assert run_cli("verify", str(out)).returncode == 0
    floats = stored["float32"]
    assert stored["float16"].dtype == np.float16 and (stored["float16"] == floats.astype(np.float16)).all()
    for precision in ("binary", "ubinary"):
        expected = quantize_embeddings(floats, precision)
        assert stored[precision].dtype == expected.dtype and (stored[precision] == expected).all()
        assert stored[precision].shape == (40, 48)
    for precision in ("int8", "uint8"):
        ranges = np.array(read_manifest(tmp_path / precision)["int8_ranges"], np.float32)
        np.testing.assert_allclose(ranges, np.vstack((floats.min(axis=0), floats.max(axis=0))), atol=1e-6)
        expected = quantize_embeddings(floats, precision, ranges=ranges)
        assert stored[precision].dtype == expected.dtype and (stored[precision] == expected).all()
        assert len(np.unique(stored[precision])) > 200         # the buckets are used, not one value


def test_a_resumed_int8_job_keeps_the_ranges_it_recorded(tmp_path):
    src = _corpus(tmp_path / "rows.jsonl", 60)
    out = tmp_path / "out"
    common = ["run", "--input", str(src), "--output", str(out), "--output-dtype", "int8", "--unit-rows", "20",
              "--progress", "off"]
    assert run_cli(*common, "--calibration-rows", "60").returncode == 0
    first = read_manifest(out)["int8_ranges"]
    full = _stored(out)
    # Undo the last two units' commits, as a crash before them would have left the ledger, and rerun with another
    # calibration size: the rerun must quantize with the recorded ranges, not new ones.
    ledger = (out / "_ledger.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in ledger]
    assert kinds[:2] == ["job", "calibration"] and kinds.count("unit") == 3
    (out / "_ledger.jsonl").write_text("\n".join(ledger[:3]) + "\n")
    (out / "_SUCCESS").unlink()
    proc = run_cli(*common, "--calibration-rows", "2")
    assert proc.returncode == 0 and "resuming" in proc.stderr, proc.stderr[-2000:]
    manifest = read_manifest(out)
    assert manifest["int8_ranges"] == first and manifest["units_resumed"] == 1
    assert (_stored(out) == full).all()


@needs_mpi
def test_encoder_ranks_agree_on_one_range(tmp_path):
    src = _corpus(tmp_path / "rows.jsonl", 120)
    proc = mpirun(5, "--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer-ranks", "2",
                  "--unit-rows", "20", "--output-dtype", "int8", "--calibration-rows", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "out")
    encoders = [r for r in manifest["ranks"] if r["role"] == "encoder"]
    assert len(encoders) == 2 and all(r["rows"] > 0 for r in encoders)
    assert all(r["startup"]["built"] <= r["startup"]["calibrated"] <= r["startup"]["ready"] for r in encoders)
    assert len(manifest["int8_ranges"][0]) == 384
    assert run_cli("verify", str(tmp_path / "out")).returncode == 0
