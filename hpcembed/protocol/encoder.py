"""The encoder rank's protocol core: when it takes batches in, when credits go back, and when a unit's part is
complete and its shard may be written. It holds counts only; the driver (roles/encoder.py in real time,
scaling/sim.py in virtual time) holds the rows, runs the encoders and writes the shards.

The window rule: the rank takes a batch in only while the tokens waiting to be encoded (plus any still arriving)
are fewer than window_batches x max_batch_tokens, or a batch's worth for each linked tokenizer rank where that is
more. A sender's blocking MPI Send completes when the batch is taken in, so a full window holds its tokenizers
back.

The credit rule, this side: one initial grant of `credits` to each linked tokenizer rank, then one Credit per batch
once its tokens have been submitted to an encoder, oldest batch first. Credits go back as the encoder consumes
tokens, not when a batch lands in the window: that way a tokenizer's free credit measures this rank's speed, and
routing by free credit balances the load. When nothing is left waiting, every batch still owed is credited, which
settles the rounding of batches split across encoder batches.

A unit's part is complete when its UnitEnd has said how many rows were sent here and that many are embedded.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..topology import RoleMap
from .messages import Credit, PartWritten, RankReport, Send, Stop, UnitEnd

# The most batches the window grows to for the tokenizer ranks linked here (about 300 MB of token batches at
# 262,144 tokens); beyond it, as with --dedup's every-rank links at scale, the window_batches rule alone holds.
LINKED_WINDOW_BATCHES = 256


@dataclass
class PartCount:
    expected: int | None = None         # rows of the unit sent here (from UnitEnd)
    reader: int = -1                    # the tokenizer rank that read the unit (sent the UnitEnd)
    embedded: int = 0
    tokens: int = 0


class EncoderCore:
    def __init__(self, rank: int, roles: RoleMap, credits: int, max_batch_tokens: int, window_batches: int):
        self.rank, self.roles, self.credits = rank, roles, credits
        self.max_batch_tokens = max_batch_tokens
        # Room for a batch from each linked tokenizer rank (up to LINKED_WINDOW_BATCHES): when this rank is ready
        # before the other ranks its tokenizers link to, each of them may send here first, and a batch not taken
        # in holds its sender, and all it would send elsewhere, until this rank's encoders work the window down.
        self.window_tokens = max_batch_tokens * max(window_batches,
                                                    min(len(roles.tokenizers_of(rank)), LINKED_WINDOW_BATCHES))
        self.parts: dict[int, PartCount] = {}
        self._owed: deque[tuple[int, int]] = deque()     # (tokenizer, tokens not yet submitted) in arrival order
        self._consumed = 0
        self.stopping = self.drained = False
        self.rows = self.tokens = 0

    # --- the window rule --------------------------------------------------------------------------------------
    def has_room(self, waiting_tokens: int, arriving_tokens: int = 0) -> bool:
        return waiting_tokens + arriving_tokens < self.window_tokens

    # --- the credit rule --------------------------------------------------------------------------------------
    def start(self) -> list[Send]:
        return [Send(t, Credit(self.credits)) for t in self.roles.tokenizers_of(self.rank)]

    def batch_taken(self, source: int, tokens: int) -> None:
        self._owed.append((source, tokens))

    def batch_emptied(self, source: int) -> list[Send]:
        """A batch taken in left nothing to encode (--dedup: every row a repeat its owner found on arrival): its
        credit goes back at once, as no submission will return it."""
        return [Send(source, Credit(1))]

    def submitted(self, tokens: int, window_empty: bool) -> list[Send]:
        """`tokens` left the window for an encoder; `window_empty`: nothing is left waiting."""
        out = []
        self._consumed += tokens
        while self._owed and self._consumed >= self._owed[0][1]:
            source, owed = self._owed.popleft()
            self._consumed -= owed
            out.append(Send(source, Credit(1)))
        if window_empty:
            out += [Send(source, Credit(1)) for source, _ in self._owed]
            self._owed.clear()
            self._consumed = 0
        return out

    # --- parts and the stop -----------------------------------------------------------------------------------
    def handle(self, source: int, message) -> list[int]:
        """A control message for the core (UnitEnd, Stop); returns the units whose part is now complete."""
        if isinstance(message, UnitEnd):
            part = self.parts.setdefault(message.unit, PartCount())
            part.expected, part.reader = message.rows, source
            return [message.unit] if self._complete(message.unit) else []
        if isinstance(message, Stop):
            self.stopping, self.drained = True, message.drain
            return []
        raise RuntimeError(f"encoder rank {self.rank} got unexpected {type(message).__name__} from rank {source}")

    def embedded(self, unit: int, rows: int, tokens: int) -> bool:
        """`rows` of `unit` came back from an encoder; True when that completes the unit's part."""
        part = self.parts.setdefault(unit, PartCount())
        part.embedded += rows
        part.tokens += tokens
        self.rows += rows
        self.tokens += tokens
        return self._complete(unit)

    def _complete(self, unit: int) -> bool:
        part = self.parts[unit]
        return part.expected is not None and part.embedded >= part.expected

    def written(self, unit: int, shard: str, size: int = -1, digest: str = "", stored: int = -1,
                companion: tuple = ()) -> Send:
        """The complete part is in its shard (of `size` bytes, checksum `digest`, `stored` rows where that is
        not the rows embedded, `companion` its .npy's size and checksum): the PartWritten the conductor commits
        on, sent to the sub-conductor of the unit's tokenizer where it has one."""
        part = self.parts.pop(unit)
        stored = -1 if stored == part.embedded else stored
        return Send(self.roles.conductor_of(part.reader), PartWritten(unit, shard, part.embedded, part.tokens, size,
                                                                      digest, stored, list(companion)))

    def finish(self, stats) -> list[Send]:
        """The rank's last report. Parts still open are an error, unless a drain abandoned their units (the next
        run redoes them)."""
        if self.parts and not self.drained:
            raise RuntimeError(f"encoder rank {self.rank} stopped with units {sorted(self.parts)} incomplete")
        self.parts.clear()
        return [Send(self.roles.conductor, RankReport(stats))]
