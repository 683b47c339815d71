"""`hpcembed run --rehearse`: every rank in its real role under mpiexec, the compute stages stood in for at set
rates; its output marked as what it is; and a rehearsal measured by `hpcembed scaling measure` and replayed by
`hpcembed scaling simulate`, with the conductor's cost per message on both sides."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .conftest import REPO, mpirun, needs_mpi, read_manifest, run_cli, write_jsonl


def _corpus(directory, files: int = 3, rows: int = 400, unit_rows: int = 100):
    directory.mkdir()
    ids = []
    for f in range(files):
        names = [f"f{f}-{k}" for k in range(rows)]
        pq.write_table(pa.table({"id": names, "text": [f"text {n} " + "word " * (k % 40) for k, n in
                                                        enumerate(names)]}),
                       directory / f"part-{f}.parquet", row_group_size=unit_rows)
        ids += names
    return ids


@needs_mpi
def test_rehearsal_runs_every_role_and_is_marked(tmp_path):
    ids = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    proc = mpirun(6, "--input", str(tmp_path / "in"), "--output", str(out), "--rehearse", "2e6,2e7",
                  "--tokenizer-ranks", "3", "--unit-rows", "100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rehearsal complete (zero embeddings, no _SUCCESS)" in proc.stderr
    manifest = read_manifest(out)
    assert manifest["rehearsal"]["tokenizer_tokens_per_s"] == 2e6
    assert manifest["rehearsal"]["encoder_tokens_per_s"] == 2e7
    assert manifest["complete"] and not (out / "_SUCCESS").exists()
    assert manifest["dtype"] == "rehearsal"
    table = ds.dataset(str(out), format="parquet").to_table()
    assert sorted(table["id"].to_pylist()) == sorted(ids)                  # every row once
    embeddings = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert embeddings.shape == (len(ids), 384) and not embeddings.any()
    roles = [r["role"] for r in manifest["ranks"]]
    assert sorted(roles) == ["conductor", "encoder", "encoder", "tokenizer", "tokenizer", "tokenizer"]
    conductor = manifest["ranks"][0]
    # RequestUnit, AssignUnit's partners and every unit's UnitRead and PartWritten reached it.
    assert conductor["messages_handled"] >= 2 * len(ids) // 100
    assert 0 < conductor["handling_seconds"] < manifest["wall_seconds"]
    for r in manifest["ranks"]:
        if r["role"] == "tokenizer":
            assert r["tokenizer_backend"] == "rehearsal"
            # Stood in at 2M tokens/s: a rank's tokenizing time is at least its tokens at that rate.
            assert r["busy_seconds"] >= r["tokens"] / 2e6
        elif r["role"] == "encoder":
            assert r["engine"] == "rehearsal" and r["busy_seconds"] >= r["tokens"] / 2e7 * 0.99

    # A real job on the same input never takes the rehearsal's output for its own.
    real = run_cli("run", "--input", str(tmp_path / "in"), "--output", str(out), "--progress", "off")
    assert real.returncode == 2 and "holds the output of a different job" in real.stderr, real.stderr[-2000:]


def test_rehearse_values_are_checked(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
    base = ("run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out"), "--progress", "off")
    for value in ("1e6", "1e6,0", "fast,slow", "1e6,2e7,3"):
        proc = run_cli(*base, "--rehearse", value)
        assert proc.returncode == 2 and "--rehearse takes TOKENIZER,ENCODER" in proc.stderr, (value, proc.stderr)
    proc = run_cli(*base, "--rehearse", "1e6,2e7", "--output-dtype", "int8")
    assert proc.returncode == 2 and "calibrate int8/uint8 output" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@needs_mpi
def test_rehearsal_is_measured_and_replayed(tmp_path):
    """`hpcembed scaling measure` records the conductor's messages and its time per message; `simulate` replays
    the run through the real cores and sets its own charge per message beside the measured one."""
    _corpus(tmp_path / "in", files=4, rows=2500, unit_rows=250)       # about 3 s at these rates
    study = tmp_path / "study"
    proc = run_cli("scaling", "measure", "--study", str(study), "--series", "rehearsal", "--scales", "1",
                   "--ranks-per-node", "4", "--tokenizers-per-node", "3", "--virtual-nodes", "--",
                   "--input", str(tmp_path / "in"), "--rehearse", "3e4,1e7", "--unit-rows", "250", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((study / "measured.json").read_text())["rows"][0]
    assert row["tokenizers"] == 3 and row["gpus"] == 1
    assert row["conductor"]["messages_handled"] >= 2 * 40           # 40 units
    assert row["conductor"]["handling_us_per_message"] > 0
    proc = run_cli("scaling", "simulate", "--calibration", str(REPO / "scaling_results/h100-box/calibration.json"),
                   "--measured", str(study / "measured.json"), "--nodes", "1", "--output", str(study),
                   "--network-ablation-up-to", "0", timeout=400)
    result = json.loads((study / "results.json").read_text())
    check = result["validation"][0]
    assert check["conductor_us_per_message_measured"] == row["conductor"]["handling_us_per_message"]
    assert check["conductor_us_per_message_simulated"] > 0
    # The study's tolerance: the replay of a run of a few seconds at these set rates.
    assert proc.returncode == 0 and check["within_tolerance"], (check, proc.stdout[-2000:])
