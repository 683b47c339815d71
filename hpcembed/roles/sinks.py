"""Where a tokenizer rank's batches go. An embedding job's EncoderSink sends each to an encoder rank; a tokenize
job's ShardSink writes this rank's own token shard per unit (io/tokens.py), reported to the conductor as an encoder
rank reports an embedding shard. The rank (roles/tokenizer.py) drives either the same way."""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from ..io.digest import file_digest
from ..io.sources import WorkUnit
from ..io.tokens import TokenShardWriter, token_shard_name
from ..protocol.messages import PartWritten, Send
from ..protocol.tokenizer import UnitProgress
from ..tokenize.batch import TokenBatch

if TYPE_CHECKING:
    from .tokenizer import TokenizerRank


class EncoderSink:
    """An embedding job's sink: each batch goes to the encoder rank the core routes it to. Until the first grant
    comes, batches are held here (TokenizerCore.holds) and the rank tokenizes on; all of a unit's go before its
    UnitEnd."""

    checks_ids = True

    def __init__(self):
        self.held: deque[TokenBatch] = deque()

    def put(self, rank: "TokenizerRank", unit: WorkUnit, batch: TokenBatch, progress: UnitProgress,
            owner: int | None = None) -> None:
        """`owner`: the encoder rank the batch's rows belong to (--dedup); else the core routes by credit."""
        rank.first_formed_at = rank.first_formed_at or time.time()
        if owner is None and (self.held or rank.core.holds(0)):     # only until the first grant's batches go
            while rank.receive(0):          # a grant may have come
                pass
            if rank.core.holds(len(self.held)):
                self.held.append(batch)
                rank.read_ahead_rows += batch.num_rows
                return
            while self.held:
                self._send(rank, self.held.popleft(), progress, None)
        self._send(rank, batch, progress, owner)

    def _send(self, rank: "TokenizerRank", batch: TokenBatch, progress: UnitProgress, owner: int | None) -> None:
        clock = time.perf_counter
        start = clock()
        while True:
            while rank.receive(0):          # take every credit already waiting
                pass
            now = time.monotonic()
            dest = rank.core.route(progress, owner, now)
            if dest is not None:
                break
            rank.receive(rank.core.grant_wait(now))
        sending = clock()
        rank.transport.send_batch(dest, batch)
        rank.first_sent_at = rank.first_sent_at or time.time()
        rank.core.sent(dest, batch.num_rows, batch.num_tokens, progress)
        rank.other["credit_wait"] += sending - start
        rank.other["send"] += clock() - sending

    def unit_done(self, rank: "TokenizerRank", unit: WorkUnit, progress: UnitProgress) -> list[Send]:
        while self.held:
            self._send(rank, self.held.popleft(), progress, None)
        return []

    def unit_abandoned(self, unit: WorkUnit) -> None:
        """Rows already sent are discarded by the encoder ranks when the conductor stops them; held ones are
        dropped."""
        self.held.clear()


class ShardSink:
    """A tokenize job's sink: this rank's own token shard per unit. Repeated ids are not checked here: the
    embedding job reads every id of a token directory and checks them all, as it does for text input."""

    checks_ids = False

    def __init__(self, output_path):
        self.output_path = output_path
        self.shards: dict[int, TokenShardWriter] = {}

    def put(self, rank: "TokenizerRank", unit: WorkUnit, batch: TokenBatch, progress: UnitProgress) -> None:
        start = time.perf_counter()
        me = rank.transport.rank
        shard = self.shards.get(unit.unit)
        if shard is None:
            shard = self.shards[unit.unit] = TokenShardWriter(self.output_path, token_shard_name(unit.unit, me))
        shard.write(batch.to_arrow())
        rank.core.sent(me, batch.num_rows, batch.num_tokens, progress)
        rank.busy += time.perf_counter() - start

    def unit_done(self, rank: "TokenizerRank", unit: WorkUnit, progress: UnitProgress) -> list[Send]:
        shard = self.shards.pop(unit.unit, None)
        if shard is None:
            return []
        shard.close()
        return [Send(rank.core.conductor, PartWritten(unit.unit, shard.final.name, shard.rows, progress.tokens,
                                                            shard.final.stat().st_size, file_digest(shard.final)))]

    def unit_abandoned(self, unit: WorkUnit) -> None:
        shard = self.shards.pop(unit.unit, None)
        if shard is not None:
            shard.discard()
