"""TokenBatch layout, token-budget batching, pooling and the shard writer."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from hpcembed.batching import TokenBudgetBatcher
from hpcembed.engine.instances import InstancePool
from hpcembed.engine.pooling import pool
from hpcembed.io.writer import OutputDir
from hpcembed.tokenize.batch import TokenBatch


def make_batch(lengths, unit=0, first_row=0):
    tokens = [list(range(100 * k, 100 * k + n)) for k, n in enumerate(lengths)]
    rows = np.arange(first_row, first_row + len(lengths))
    return TokenBatch.build(tokens, [f"id{r}" for r in rows], rows, unit), tokens


def test_token_batch_arrow_layout_and_take():
    batch, tokens = make_batch([3, 1, 4, 0])
    assert batch.token_ids.dtype == np.int32 and batch.offsets.tolist() == [0, 3, 4, 8, 8]
    rb = batch.to_arrow()
    assert rb.column("input_ids").to_pylist() == tokens and rb.column("id").to_pylist() == ["id0", "id1", "id2", "id3"]
    taken = batch.take(np.array([2, 0]))
    assert taken.to_arrow().column("input_ids").to_pylist() == [tokens[2], tokens[0]]
    assert taken.ids() == ["id2", "id0"] and taken.rows.tolist() == [2, 0]
    both = TokenBatch.concat([taken, make_batch([2], unit=5, first_row=9)[0]])
    assert both.ids() == ["id2", "id0", "id9"] and both.units.tolist() == [0, 0, 5]
    assert both.lengths.tolist() == [4, 3, 2]


def padded_cost(lengths):
    return int(len(lengths) * lengths.max())


def test_batcher_longest_first_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200)
    batcher = TokenBudgetBatcher(max_batch_tokens=256, cost=padded_cost)
    for start in range(0, 200, 50):
        batcher.add(make_batch(lengths[start:start + 50], first_row=start)[0])
    seen, previous_max = [], None
    while (out := batcher.pop()) is not None:
        assert padded_cost(out.lengths) <= 256
        assert list(out.lengths) == sorted(out.lengths, reverse=True)
        if previous_max is not None:
            assert out.lengths.max() <= previous_max
        previous_max = out.lengths.min()
        seen += out.rows.tolist()
    assert sorted(seen) == list(range(200)) and batcher.tokens == 0


def test_batcher_emits_oversized_row_alone():
    batcher = TokenBudgetBatcher(8, padded_cost)
    batcher.add(make_batch([20, 2, 2])[0])
    assert batcher.pop().lengths.tolist() == [20]
    assert batcher.pop().lengths.tolist() == [2, 2]


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
def test_pooling_ignores_padding(mode):
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    hidden = torch.zeros(2, 5, 8)
    hidden[0], hidden[1, :3] = a, b
    hidden[1, 3:] = 1e4                       # garbage in the pad positions must not leak
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    out = pool(hidden, mask, mode)
    expect = {"mean": lambda x: x.mean(0), "cls": lambda x: x[0], "max": lambda x: x.max(0).values,
              "lasttoken": lambda x: x[-1]}[mode]
    torch.testing.assert_close(out[0], expect(a))
    torch.testing.assert_close(out[1], expect(b))


def test_writer_shards_read_as_one_dataset(tmp_path):
    out = OutputDir(str(tmp_path / "o"))
    assert out.open({"job": 1}, [], overwrite=False)[0] == "fresh"
    emb = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    out.write_shard("part-1.parquet", pa.array(["a", "b"]), emb[:2])
    out.write_shard("part-2.parquet", pa.array(["c", "d"]), emb[2:])
    table = ds.dataset(str(tmp_path / "o")).to_table()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 6)
    got = table["embedding"].combine_chunks().flatten().to_numpy().reshape(4, 6)
    np.testing.assert_array_equal(got, emb)
    assert not list((tmp_path / "o").glob(".*tmp"))


def test_assembler_cuts_unit_to_token_budget_in_input_order():
    from hpcembed.batching import BatchAssembler
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 40, size=500)
    assembler = BatchAssembler(batch_tokens=300)
    sent = []
    for start in range(0, 500, 64):                     # chunks as a tokenizer reads them
        sent += assembler.add(make_batch(lengths[start:start + 64], first_row=start)[0])
    assert all(b.num_tokens <= 300 for b in sent)
    # Full batches leave only once the next row would not fit.
    assert all(b.num_tokens + lengths[b.rows[-1] + 1] > 300 for b in sent)
    rest = assembler.flush()
    assert rest is not None and rest.num_tokens <= 300 and assembler.flush() is None
    every = sent + [rest]
    assert np.concatenate([b.rows for b in every]).tolist() == list(range(500))
    got = [row for b in every for row in b.to_arrow().column("input_ids").to_pylist()]
    assert got == [list(range(100 * (k % 64), 100 * (k % 64) + n)) for k, n in enumerate(lengths)]
    assert [i for b in every for i in b.ids()] == [f"id{r}" for r in range(500)]


def test_assembler_row_longer_than_budget_leaves_alone():
    from hpcembed.batching import BatchAssembler
    assembler = BatchAssembler(batch_tokens=10)
    out = assembler.add(make_batch([3, 25, 4])[0])
    assert [b.lengths.tolist() for b in out] == [[3], [25]]
    assert assembler.flush().lengths.tolist() == [4]


def test_assembler_keeps_a_texts_windows_in_one_batch_and_they_survive_the_wire():
    from hpcembed.batching import BatchAssembler
    from hpcembed.io.digest import row_digests
    # Texts of 1, 3, 2 and 4 windows of 10 tokens; the budget (25) would cut inside the second and the fourth.
    windows = [1, 3, 2, 4]
    numbers = np.concatenate([np.arange(n) for n in windows])
    chunks = np.stack([numbers, 5 * numbers, 5 * numbers + 9], axis=1).astype(np.int64)
    batch, _ = make_batch([10] * len(numbers))
    batch.chunks = chunks
    batch.digests = digests = row_digests(batch.token_ids, batch.offsets, seed=7)
    assert len({d.tobytes() for d in digests}) == len(digests)      # make_batch's rows differ
    assembler = BatchAssembler(batch_tokens=25)
    sent = assembler.add(batch)
    rest = assembler.flush()
    every = sent + ([rest] if rest is not None else [])
    assert [b.num_rows for b in every] == [1, 3, 2, 4]          # cut only where a text starts
    assert all(b.chunks[0, 0] == 0 for b in every)
    back = [TokenBatch.from_wire(b.to_wire()) for b in every]
    assert np.concatenate([b.chunks for b in back]).tolist() == chunks.tolist()
    assert (np.concatenate([b.digests for b in back]) == digests).all()         # and each row's digest with it
    assert all(b.claimed for b in back)
    every[0].claimed = False            # --dedup: rows read ahead go unclaimed, and the owner must know it
    assert [TokenBatch.from_wire(b.to_wire()).claimed for b in every] == [False, True, True, True]
    joined = TokenBatch.concat(back).take(np.array([3, 1]))
    assert joined.chunks.tolist() == chunks[[3, 1]].tolist() and (joined.digests == digests[[3, 1]]).all()


def test_batcher_passes_ready_batches_through_and_rebatches_the_rest():
    batcher = TokenBudgetBatcher(100, lambda lengths: int(lengths.sum()), pass_through=True)
    ready = make_batch([30, 10, 20], unit=1)[0]                   # 60 tokens: at least half the budget
    small = [make_batch([5, 9], unit=u, first_row=10)[0] for u in (2, 3)]
    batcher.add(small[0])
    batcher.add(ready)
    batcher.add(small[1])
    assert batcher.pop() is ready                                   # as it arrived, not copied or sorted
    rest = batcher.pop()
    assert rest.lengths.tolist() == [9, 9, 5, 5] and batcher.pop() is None and batcher.tokens == 0


def test_batcher_prefers_rebatched_rows_once_they_fill_a_batch():
    batcher = TokenBudgetBatcher(20, lambda lengths: int(lengths.sum()), pass_through=True)
    small = [make_batch([4, 4], first_row=2 * k)[0] for k in range(3)]     # 24 tokens in all, each not ready
    for b in small:
        batcher.add(b)
    ready = make_batch([12])[0]
    batcher.add(ready)
    first = batcher.pop()
    assert first is not ready and first.num_tokens == 20
    assert batcher.pop() is ready
    assert batcher.pop().num_tokens == 4 and batcher.pop() is None


def test_padding_batcher_never_passes_through():
    batcher = TokenBudgetBatcher(100, padded_cost, pass_through=False)
    batch = make_batch([30, 10, 20])[0]
    batcher.add(batch)
    out = batcher.pop()
    assert out is not batch and out.lengths.tolist() == [30, 20, 10]


class _QueueingEncoder:
    """Stands in for a GPU stream's queue (the CUDA path runs only on the GPU box): `launch` logs and returns at
    once, `result` logs; embeddings are each row's first token, so order mix-ups show."""

    launch_ahead = 2
    build_seconds: dict = {}

    def __init__(self, log, fail_row=None):
        self.log, self.fail_row = log, fail_row

    def launch(self, batch):
        from hpcembed.engine.base import Pending
        first = int(batch.rows[0])
        self.log.append(("launch", first))
        encoder = self

        class _Later(Pending):
            def result(self):
                encoder.log.append(("result", first))
                if first == encoder.fail_row:
                    raise RuntimeError(f"row {first} failed")
                return batch.token_ids[batch.offsets[:-1]].astype(np.float32)[:, None]

        return _Later()


def test_pool_launches_ahead_and_returns_in_submission_order():
    log: list = []
    pool = InstancePool([_QueueingEncoder(log)], depth=2)
    batches = [make_batch([2, 3], first_row=2 * k)[0] for k in range(6)]
    got = []
    for b in batches:
        while pool.capacity == 0:
            got += pool.completed(wait=1.0)
        pool.submit(b)
    while pool.in_flight:
        got += pool.completed(wait=1.0)
    pool.close()
    assert [b.rows[0] for b, _ in got] == [2 * k for k in range(6)]
    assert all((emb[:, 0] == b.token_ids[b.offsets[:-1]]).all() for b, emb in got)
    # Never more than two launched and not yet taken, and every result taken after the next launch when one came.
    launched = 0
    for what, _ in log:
        launched += 1 if what == "launch" else -1
        assert 0 <= launched <= 2
    assert ("launch", 2) in log and log.index(("launch", 2)) < log.index(("result", 0))


def test_pool_hands_a_failed_result_to_the_caller():
    log: list = []
    pool = InstancePool([_QueueingEncoder(log, fail_row=2)], depth=2)
    for k in range(2):
        pool.submit(make_batch([1, 1], first_row=2 * k)[0])
    with pytest.raises(RuntimeError, match="row 2 failed"):
        for _ in range(100):
            pool.completed(wait=0.1)
    pool.close()
    assert ("result", 0) in log and pool.in_flight == 0


def test_batcher_never_leaves_a_short_row_waiting_behind_a_stream_of_longer_ones():
    """A padding encoder's batcher takes the longest rows first; with batches arriving all the time the short
    rows of the first one would wait to the end of the job, and its unit's part would never complete before."""
    batcher = TokenBudgetBatcher(64, padded_cost)
    first_row_out = None
    for k in range(200):
        batcher.add(make_batch([2] + [16] * 4, first_row=10 * k)[0])     # one short row, then long ones
        out = batcher.pop()
        if first_row_out is None and 0 in out.rows.tolist():
            first_row_out = k
    assert first_row_out is not None and first_row_out <= TokenBudgetBatcher.OVERTAKEN_AT_MOST + 2, first_row_out
    while batcher.pop() is not None:
        pass
    assert batcher.rows == 0 and batcher.tokens == 0
