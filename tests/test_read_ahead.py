"""A slow model build: the encoder rank's start is held back while the tokenizer rank reads. Without --dedup the
tokenizer rank tokenizes and holds batches until it has credit (TokenizerCore.holds), and nothing held is lost or
sent twice; with --dedup it tokenizes and holds chunks and sends them unclaimed once the owner has granted credit
(the owner finds their repeats), and the job is as complete and deduplicated. The job runs in one process (the
in-process launcher: the same roles and drivers an MPI job runs)."""
from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from hpcembed import cli
from hpcembed.roles.encoder import EncoderRank

from .conftest import assert_complete_output, write_corpus

BUILD_SECONDS = 1.0        # the encoder rank starts this late; reading the whole corpus takes well under it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, st_model):
    """120 rows in one file, 80 distinct texts and 40 repeats of them: every third row repeats an earlier text, so
    that the first unit, read ahead, holds repeats (of its own rows) as the second does (of both units')."""
    rng = np.random.default_rng(5)
    words = ["rank", "shard", "token", "grant", "claim", "owner", "雨", "🙂"]
    distinct = list(dict.fromkeys(" ".join(rng.choice(words, size=int(rng.integers(2, 20)))) for _ in range(90)))[:80]
    texts, given = {}, 0
    for k in range(120):
        if k % 3 != 2:
            texts[f"r{k:03d}"], given = distinct[given], given + 1
        else:
            texts[f"r{k:03d}"] = distinct[int(rng.integers(given))]
    root, expected = write_corpus(tmp_path_factory.mktemp("read-ahead"), texts, 1, st_model)
    return root, texts, expected


@pytest.fixture
def late_encoder(monkeypatch):
    run = EncoderRank.run

    def run_late(self):
        time.sleep(BUILD_SECONDS)
        run(self)
    monkeypatch.setattr(EncoderRank, "run", run_late)
    monkeypatch.setenv("HPCEMBED_MPI", "0")


@pytest.mark.parametrize("dedup", ["off", "on"])
def test_a_late_encoder_rank_loses_nothing(corpus, tmp_path, model_dir, late_encoder, dedup):
    root, texts, expected = corpus
    out = tmp_path / "out"
    code = cli.main(["run", "--input", str(root), "--output", str(out), "--model", model_dir, "--device", "cpu",
                     "--unit-rows", "60", "--chunk-rows", "16", "--dedup", dedup, "--progress", "off"])
    assert code == 0
    manifest = assert_complete_output(out, expected)         # each id once, each within 1e-4 of ST
    for shard in sorted(out.glob("*.parquet")):
        # Rows keep their input order within a shard, referenced rows (which arrive after the unit's batches)
        # put back in their places beside the encoded ones.
        ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
        assert ids == sorted(ids) and len(ids) == 60, shard.name
    (entry,) = manifest["ranks"]
    # The whole first unit was read and tokenized before the late encoder rank granted credit, its batches (or,
    # with --dedup, its chunks, unclaimed) held until the grant.
    assert entry["read_ahead_rows"] == 60
    if dedup == "on":
        # The held unit went unclaimed and the owner found its 20 repeats on arrival; the second unit's rows were
        # claimed once credit had come.
        assert entry["first_answer_at"] >= entry["granted_at"] > 0
        assert manifest["rows_deduplicated"] == len(texts) - len(set(texts.values())) == 40
