"""Output types (--output-dtype): each stores what sentence-transformers' quantize_embeddings makes of the same
float embeddings; int8 and uint8 with ranges calibrated on the job's own embeddings, agreed by every encoder rank,
recorded in the ledger and the manifest, and kept by a resumed job; and the npy format (--output-format)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from sentence_transformers.util.quantization import quantize_embeddings

from hpcembed.io.quantize import convert

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
    # Each dtype's arithmetic is quantize_embeddings', byte for byte, on the same floats; each job's bytes are
    # that of its own floats, another run's, which CPU threads may round differently in the last bit: a value on
    # a bucket boundary (or a sign near zero, or a float16 rounding tie) may land one step over.
    floats = stored["float32"]
    assert stored["float16"].dtype == np.float16
    assert (convert(floats, "float16") == floats.astype(np.float16)).all()
    assert _buckets_apart(stored["float16"].view(np.int16), floats.astype(np.float16).view(np.int16)) <= 1
    for precision in ("binary", "ubinary"):
        expected = quantize_embeddings(floats, precision)
        assert (convert(floats, precision) == expected).all()
        assert stored[precision].dtype == expected.dtype and stored[precision].shape == (40, 48)
        differ = np.unpackbits(stored[precision].view(np.uint8) ^ expected.view(np.uint8))
        assert differ.mean() <= 1e-3
    for precision in ("int8", "uint8"):
        ranges = np.array(read_manifest(tmp_path / precision)["int8_ranges"], np.float32)
        np.testing.assert_allclose(ranges, np.vstack((floats.min(axis=0), floats.max(axis=0))), atol=1e-6)
        expected = quantize_embeddings(floats, precision, ranges=ranges)
        assert (convert(floats, precision, ranges) == expected).all()
        assert stored[precision].dtype == expected.dtype
        _assert_buckets_of(stored[precision], floats, ranges, precision)
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
    assert _buckets_apart(_stored(out), full) <= 1


@needs_mpi
def test_encoder_ranks_agree_on_one_range(tmp_path):
    # Enough units that the encoder rank whose credit reaches the tokenizers second still gets some: with 6 units
    # (120 rows) one rank took them all in about one run in 16.
    src = _corpus(tmp_path / "rows.jsonl", 360)
    proc = mpirun(5, "--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer-ranks", "2",
                  "--unit-rows", "20", "--output-dtype", "int8", "--calibration-rows", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "out")
    encoders = [r for r in manifest["ranks"] if r["role"] == "encoder"]
    assert len(encoders) == 2 and all(r["rows"] > 0 for r in encoders)
    assert all(r["startup"]["built"] <= r["startup"]["calibrated"] <= r["startup"]["ready"] for r in encoders)
    assert len(manifest["int8_ranges"][0]) == 384
    assert run_cli("verify", str(tmp_path / "out")).returncode == 0


def test_npy_output_is_the_same_embeddings_beside_parquet_ids(tmp_path):
    src = _corpus(tmp_path / "rows.jsonl", 50)
    common = ["run", "--input", str(src), "--unit-rows", "20", "--progress", "off", "--output-dtype", "float16"]
    assert run_cli(*common, "--output", str(tmp_path / "parquet")).returncode == 0
    out = tmp_path / "npy"
    assert run_cli(*common, "--output", str(out), "--output-format", "npy").returncode == 0
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 3 and all(s.with_suffix(".npy").exists() for s in shards)
    ids = [i for s in shards for i in pq.read_table(s).column("id").to_pylist()]
    arrays = [np.load(s.with_suffix(".npy"), mmap_mode="r") for s in shards]
    assert all(a.dtype == np.dtype("<f2") and a.shape[1] == 384 for a in arrays)
    expected = ds.dataset(str(tmp_path / "parquet"), format="parquet").to_table()
    by_id = dict(zip(expected["id"].to_pylist(), expected["embedding"].to_numpy(zero_copy_only=False)))
    # Two runs' float16: equal but for a last-bit rounding of another run's floats.
    assert _buckets_apart(np.concatenate(arrays).view(np.int16), np.stack([by_id[i] for i in ids]).view(np.int16)) <= 1
    assert read_manifest(out)["output_format"] == "npy" and run_cli("verify", str(out)).returncode == 0
    # A lost .npy is named by verify, and a rerun redoes its unit.
    shards[1].with_suffix(".npy").unlink()
    proc = run_cli("verify", str(out))
    assert proc.returncode == 3 and f"shard {shards[1].name} has no {shards[1].with_suffix('.npy').name}" in proc.stderr
    proc = run_cli(*common, "--output", str(out), "--output-format", "npy")
    assert proc.returncode == 0 and "unit 1 is redone" in proc.stderr, proc.stderr[-2000:]
    assert run_cli("verify", str(out)).returncode == 0


def test_dropping_ids_rewrites_the_npy_with_its_shard(tmp_path):
    import pyarrow as pa
    from hpcembed.io.ids import id_digest
    from hpcembed.io.writer import OutputDir
    out = OutputDir(str(tmp_path), output_format="npy")
    name = "part-00000000-r00001.parquet"
    embeddings = np.arange(12, dtype=np.float32).reshape(3, 4)
    written = out.write_shard(name, pa.array(["a", "b", "c"]), embeddings)
    assert len(written.record) == 4 and out._check_shard(name, 3, written.record) is None
    removed, rewritten = out.drop_ids(name, {id_digest("b")})
    assert removed == ["b"] and rewritten.rows == 2
    assert (np.load(tmp_path / "part-00000000-r00001.npy") == embeddings[[0, 2]]).all()
    assert pq.read_table(tmp_path / name).column("id").to_pylist() == ["a", "c"]
    assert out._check_shard(name, 2, rewritten.record) is None
    # The ledger's record of the .npy is checked too: the old one no longer matches.
    assert "part-00000000-r00001.npy of" in out._check_shard(name, 2, rewritten.record[:2] + list(written.companion))


def test_int8_of_pooled_windows_is_calibrated_on_what_is_stored(tmp_path):
    # Long texts, so most are several windows; calibrated on every row, the ranges are the stored means' range.
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"w{k}", "text": f"pooled window text number {k} " * 12}
                                                for k in range(24)])
    common = ["run", "--input", str(src), "--chunk-tokens", "32", "--chunk-overlap", "4", "--chunk-pooling", "mean",
              "--calibration-rows", "24", "--progress", "off"]
    assert run_cli(*common, "--output", str(tmp_path / "f32")).returncode == 0
    assert run_cli(*common, "--output", str(tmp_path / "i8"), "--output-dtype", "int8").returncode == 0
    floats = _stored(tmp_path / "f32")
    ranges = np.array(read_manifest(tmp_path / "i8")["int8_ranges"], np.float32)
    np.testing.assert_allclose(ranges, np.vstack((floats.min(axis=0), floats.max(axis=0))), atol=1e-5)
    _assert_buckets_of(_stored(tmp_path / "i8"), floats, ranges, "int8")


def _buckets_apart(got: np.ndarray, want: np.ndarray) -> int:
    """The largest difference in steps (buckets, or float16 bit patterns); at most one value in a thousand may
    differ at all."""
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert (diff > 0).mean() <= 1e-3, f"{int((diff > 0).sum())} of {diff.size} values differ"
    return int(diff.max())


# How far apart two CPU runs' floats may be: batches are padded to their longest row and cut by timing, so the same
# text is computed in other shapes (the ranges above agree to 1e-5).
RUN_TO_RUN = 5e-5


def _assert_buckets_of(got: np.ndarray, floats: np.ndarray, ranges: np.ndarray, precision: str) -> None:
    """`got`, a job's int8/uint8 bytes, is quantize_embeddings of another run's `floats`, except one step over
    where a float lies within RUN_TO_RUN of a bucket's edge."""
    want = quantize_embeddings(floats, precision, ranges=ranges)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    steps = (ranges[1] - ranges[0]) / 255
    edge_distance = np.abs((floats - ranges[0]) / steps - np.round((floats - ranges[0]) / steps)) * steps
    assert diff.max() <= 1 and (edge_distance[diff > 0] <= RUN_TO_RUN).all(), \
        f"{int((diff > 0).sum())} values differ, {int((edge_distance[diff > 0] > RUN_TO_RUN).sum())} away from an edge"
