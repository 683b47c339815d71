"""The server's scheduler (serve/scheduler.py) over real CPU encoder instances of the bundled model: with an
instance of the interactive lane's own (what a GPU server has, launch/build.py), a query is answered while the
bulk batches run; with every instance shared, it waits for the bulk batch its instance runs."""
from __future__ import annotations

import time

import numpy as np
import pytest

from hpcembed.engine import ModelSpec
from hpcembed.engine.instances import InstancePool
from hpcembed.engine.varlen import VarlenEncoder
from hpcembed.serve.scheduler import Scheduler
from hpcembed.serve.tokenizing import request_batch

BULK_TOKENS = 2048                   # one bulk request: one engine batch of 16 texts of 128 tokens


class AnswerOrder:
    """The scheduler's metrics hooks; keeps the lanes of answered requests in the order they were answered."""

    def __init__(self):
        self.lanes: list[str] = []

    def batch(self, lane: str, rows: int, tokens: int) -> None:
        pass

    def answered(self, lane: str, seconds: float) -> None:
        self.lanes.append(lane)


def _texts(rng, rows: int, tokens: int) -> list[list[int]]:
    return [[101, *rng.integers(1000, 20000, tokens - 2).tolist(), 102] for _ in range(rows)]


@pytest.mark.parametrize("reserved", [1, 0])
def test_a_query_takes_an_instance_of_its_own_and_waits_for_no_bulk_batch(model_dir, reserved):
    spec = ModelSpec.load(model_dir)
    first = VarlenEncoder(spec, "cpu", "fp32")
    # The second instance shares the first one's weights, as a GPU server's low-latency instance does; with
    # nothing reserved it is an ordinary second instance.
    encoders = [first, VarlenEncoder(spec, "cpu", "fp32", weights_of=first)]
    assert encoders[1].weights is first.weights
    order = AnswerOrder()
    scheduler = Scheduler(encoders, spec.dim, BULK_TOKENS, 256, 16, {"interactive": 1e4, "bulk": 1e5}, order,
                          reserved=reserved)
    rng = np.random.default_rng(0)
    bulk = [request_batch(_texts(rng, 16, BULK_TOKENS // 16)) for _ in range(2)]
    query = request_batch(_texts(rng, 1, 9))
    try:
        bulk_answers = [scheduler.submit(b) for b in bulk]
        deadline = time.monotonic() + 30
        while scheduler.pool.in_flight < 2 - reserved and time.monotonic() < deadline:
            time.sleep(0.001)
        assert scheduler.pool.in_flight == 2 - reserved          # the bulk batches each instance may take
        if reserved:
            # Nothing queued in its lane: a query is predicted to wait for nothing, whatever bulk work runs.
            assert scheduler.predicted_wait("interactive") == 0.0
        answer = scheduler.submit(query).result(timeout=60)
        got = [future.result(timeout=120) for future in bulk_answers]
    finally:
        scheduler.close(timeout=120)
    assert order.lanes[0] == ("interactive" if reserved else "bulk"), order.lanes
    assert np.abs(answer - first.encode(query)).max() < 1e-5
    for batch, embeddings in zip(bulk, got):
        assert np.abs(embeddings - first.encode(batch)).max() < 1e-5


def test_a_pool_keeps_one_instance_for_everything_else(model_dir):
    spec = ModelSpec.load(model_dir)
    first = VarlenEncoder(spec, "cpu", "fp32")
    with pytest.raises(ValueError, match="at least one must be shared"):
        InstancePool([first], reserved=1)


def test_a_short_query_is_tokenized_at_once_and_a_long_one_in_a_thread(model_dir):
    from hpcembed.config import build_config
    from hpcembed.serve.tokenizing import INLINE_CHARS, Tokenizing
    cfg = build_config({}, {"model": model_dir}, serving=True)
    tokenizing = Tokenizing(cfg, ModelSpec.load(model_dir), threads=1, processes=0)
    try:
        short, long = ["where do the ships go?", "雨の日"], ["rain on the harbour " * (INLINE_CHARS // 10)]
        now = tokenizing.small_now(short)
        assert now is not None and tokenizing.small_now(long) is None
        threaded = tokenizing.small(short).result(timeout=30)
        assert np.array_equal(now.token_ids, threaded.token_ids) and np.array_equal(now.offsets, threaded.offsets)
        long_batch = tokenizing.small(long).result(timeout=30)
        assert long_batch.num_rows == 1 and long_batch.num_tokens == ModelSpec.load(model_dir).max_seq_length
    finally:
        tokenizing.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_bulk_steps_take_one_turn_of_the_event_loop_each(enabled):
    """Five bulk steps ready at once, and a query's task that needs a turn of the loop for each of its steps: with
    the turns, the query gets a turn between any two bulk steps; without them, the five run in one turn."""
    import asyncio

    from hpcembed.serve.turns import BulkTurns

    async def go():
        turns, order = BulkTurns(), []
        turns.enabled = enabled

        async def bulk(k: int):
            await turns.turn()
            order.append(f"bulk{k}")

        async def query():
            for _ in range(8):
                order.append("query")
                await asyncio.sleep(0)
        await asyncio.gather(*(bulk(k) for k in range(5)), query())
        return order
    order = asyncio.run(go())
    steps = [k for k, step in enumerate(order) if step.startswith("bulk")]
    assert [order[k] for k in steps] == [f"bulk{k}" for k in range(5)]      # first come, first through
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert all(gap >= 2 for gap in gaps) if enabled else gaps == [1, 1, 1, 1], order
