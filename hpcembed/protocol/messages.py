"""Control messages between roles. All are small; token data travels only as TokenBatch.

    tokenizer -> conductor   RequestUnit, UnitRead, DuplicateRows, StopRequested, RankReport, Failure
    conductor -> tokenizer   AssignUnit, NoMoreUnits, Drain, Release, SplitUnit
                             (Drain: abandon the unit being read, a graceful stop; Release: the last message a
                             tokenizer gets, so none is left unreceived when MPI finalizes; SplitUnit: give up
                             the second half of what is left of a unit, for an idle rank: protocol/stealing.py)
    tokenizer -> conductor   UnitSplit             (the answer: where the unit was cut, and the piece after it)
    encoder   -> tokenizer   Credit                (flow control: one credit = one batch in flight)
    tokenizer -> encoder     TokenBatch, UnitEnd   (UnitEnd: how many rows of a unit this encoder was sent)
    tokenizer -> encoder     Claim, References     (--dedup, roles/dedup.py: which of these digests are new;
    encoder   -> tokenizer   Claimed                rows whose digest the owner already has, to copy)
    encoder   -> conductor   Calibrated, PartWritten, PartRewritten, RankReport, Failure
                             (Calibrated: int8 output's ranges, sent before any shard quantized with them)
    conductor -> encoder     DropIds, Stop         (DropIds: remove ids found repeated across tokenizer ranks;
                                                    Stop(drain): also discard units a Drain abandoned)

A tokenize job's tokenizer ranks write their own token shards and report them with PartWritten, as an encoder
rank does.

With sub-conductors (protocol/subconductor.py), a tokenizer rank sends RequestUnit, UnitRead and RankReport to its
sub-conductor, and an encoder rank a unit's PartWritten to the sub-conductor of the tokenizer that read the unit:
    sub-conductor -> conductor   RequestUnits, UnitsCommitted, RankReports, Failure
    conductor -> sub-conductor   UnitGrant, Drain, Release
    sub-conductor -> tokenizer   AssignUnit, NoMoreUnits, Drain, Release, SplitUnit
Everything else still goes to the conductor (rank 0).

`hpcembed serve` under mpiexec (serve/ranks.py): rank 0 is the HTTP frontend instead of a conductor.
    encoder   -> frontend    ServeReady            (built and warmed up: its lanes' first rates)
    frontend  -> tokenizer   ServeTexts            (a piece of a bulk request, and the encoder rank it goes to)
    tokenizer -> encoder     TokenBatch            (the piece's rows: units = the request's key, rows = its rows)
    frontend  -> encoder     TokenBatch            (a small request, tokenized on the frontend; token-id input)
    encoder   -> frontend    ServeEmbedded, Failure
    frontend  -> tokenizer, encoder   ServeStop   (every accepted request is answered: leave)
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from typing import NamedTuple

from ..io.sources import WorkUnit
from ..manifest import RankStats


class Send(NamedTuple):
    """A message a protocol core wants sent: the driver sends it (a TokenBatch goes by the data path)."""
    dest: int
    message: object


@dataclass
class RequestUnit:
    pass


@dataclass
class AssignUnit:
    unit: WorkUnit


@dataclass
class NoMoreUnits:
    pass


@dataclass
class RequestUnits:
    """A sub-conductor's request for up to `count` units for its tokenizer ranks."""
    count: int


@dataclass
class UnitGrant:
    units: list[WorkUnit]
    last: bool                      # the conductor has no more units to hand out


@dataclass
class UnitsCommitted:
    """Units a sub-conductor found complete, in one message: made so that the conductor's work per unit is least
    (one ledger write for all, no record to decode, one string to unpickle rather than a string per unit)."""
    records: bytes                  # the units' ledger records (io/ledger.Ledger.unit_line), a line each, UTF-8
    counts: array                   # per unit: its number, the rows its shards hold, the rows rejected ('q')
    rejects: list[dict]             # the units' rejects, for the rejects file
    tokens: int                     # the tokens of the parts reported since the last UnitsCommitted (progress)
    input_rows: int                 # the units' input rows, as handed out or split (progress counts them)
    splits: list = field(default_factory=list)      # [unit, cut] of each split since the last, in order
    split_lines: bytes = b""        # their ledger records (Ledger.split_line), made here rather than on rank 0
    last: bool = False              # the sender (and the sub-conductors below it) will commit nothing more


@dataclass
class RankReports:
    """A sub-conductor's last message: its tokenizer ranks' reports and its own."""
    stats: list                     # [RankStats]


@dataclass
class SplitUnit:
    unit: int


@dataclass
class UnitSplit:
    """The answer to SplitUnit: `piece` (rows `cut` to the unit's end) for an idle rank, or None: the unit is
    done, or too little of it is left to split."""
    unit: int
    cut: int = -1
    piece: WorkUnit | None = None


@dataclass
class Credit:
    count: int


@dataclass
class UnitEnd:
    unit: int
    rows: int


@dataclass
class UnitRead:
    unit: int
    sent: dict[int, int]             # encoder rank (or the tokenizer itself, writing tokens) -> rows sent there
    tokens: int
    rejects: list[dict] = field(default_factory=list)
    rejected_rows: int = 0


@dataclass
class Calibrated:
    ranges: list[list[float]]       # [2][dim]: each dimension's minimum and maximum (launch/calibrate.py)


@dataclass
class PartWritten:
    unit: int
    shard: str
    rows: int                       # batch rows of the unit this rank was sent and embedded
    tokens: int
    size: int = -1                  # the shard's bytes and checksum (io/writer.ShardFile), for the ledger;
    digest: str = ""                # -1 and "" where no file was written (the simulation)
    stored: int = -1                # rows the shard holds, where not `rows` (chunks pooled into one row per id)
    companion: list = field(default_factory=list)      # its .npy's [bytes, checksum] (io/npy.py), if any

    @property
    def shard_rows(self) -> int:
        return self.rows if self.stored < 0 else self.stored


@dataclass
class DuplicateRows:
    """Ids repeated across tokenizer ranks or runs: (unit, file, row, first unit, first file, first row, digest)
    per repeat. File -1 is a row committed by an earlier run of the job (its row is a position in the output)."""
    rows: list[tuple[int, int, int, int, int, int, bytes]]


@dataclass
class DropIds:
    unit: int
    shard: str
    digests: list[bytes]


@dataclass
class PartRewritten:
    unit: int
    shard: str
    removed_ids: list[str]          # each once (a chunked shard held several rows of one)
    size: int = -1                  # the rewritten shard's, as in PartWritten
    digest: str = ""
    rows: int = -1                  # rows it holds now (-1: one fewer per removed id)
    companion: list = field(default_factory=list)      # its rewritten .npy's [bytes, checksum], if any


@dataclass
class Claim:
    seq: int                        # the tokenizer's claim number, echoed in the answer
    digests: bytes                  # 16 bytes per row, each owned by the rank it is sent to


@dataclass
class Claimed:
    seq: int
    first: bytes                    # one bit per digest claimed (np.packbits): 1 = the first claim (encode it)


@dataclass
class References:
    """Rows of `unit` whose digests the receiving owner has (or will have) embedded: it writes each with a copy of
    that embedding under the row's own id."""
    unit: int
    ids: list[str]
    rows: list[int]
    digests: bytes


@dataclass
class Stop:
    drain: bool = False


@dataclass
class Drain:
    pass


@dataclass
class Release:
    pass


@dataclass
class StopRequested:
    why: str


@dataclass
class RankReport:
    stats: RankStats                # a TokenizerStats or EncoderStats


@dataclass
class Failure:
    rank: int
    role: str
    message: str
    exit_code: int


@dataclass
class ServeReady:
    rates: dict                     # lane -> tokens per second of one instance (serve/local.warm_up_rates)
    instances: int
    about: dict                     # engine, device, dtype
    reserved: int = 0               # of the instances, those that take only the interactive lane


@dataclass
class ServeTexts:
    key: int                        # the request's
    first: int                      # the piece's first row in the request
    texts: list
    encoder: int                    # where the tokenized piece goes


@dataclass
class ServeEmbedded:
    key: int
    first: int
    embeddings: object              # float32 [rows, dim]
    tokens: int
    rates: dict                     # the encoder's lane rates now
    busy: float                     # the encoder's busy fraction since it started serving
    seconds: float                  # from the batch's receipt to this answer, on the encoder rank
    batches: list                   # (lane, rows, tokens) of the engine batches run since the last answer


@dataclass
class ServeStop:
    pass
