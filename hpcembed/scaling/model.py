"""What the simulation is made of, apart from the roles: the shapes of the cluster and the job, the calibrated
rates, the network that delivers messages in virtual time, and what travels in place of a token batch.

The network: within a node a message arrives after the measured shared-memory latency and bandwidth; between nodes
it goes through each host's NIC, one FIFO queue per direction (egress of the sender, ingress of the receiver) at the
NIC's bandwidth, in tandem (the ingress takes a message once the egress has begun it), plus the link latency. Flows
that share a NIC therefore share its bandwidth, a NIC that many senders target (incast) queues them, and a message
queued at a busy receiver does not keep its sender's NIC from sending to others. The fabric between NICs is taken
as non-blocking (a full fat tree), as InfiniBand clusters are built.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import simpy

from ..io.writer import shard_name
from ..transport.base import Envelope

CONTROL_BYTES = 256            # a pickled control message, rounded up


@dataclass
class NodeShape:
    """One node of the simulated cluster: what srun would start there (one rank per core)."""
    cores: int = 16
    gpus: int = 1
    gpu_name: str = "NVIDIA H100 80GB HBM3"
    tokenizers: int = 0         # 0: as the rate plan decides (world.plan_tokenizers); else exactly this many
    # The seed's disaggregated shape: >0 puts the tokenizer ranks on CPU-only nodes of this many cores (a Slurm het
    # job's component 0, the conductor on the first), as many as the rate plan needs for the GPU nodes, which
    # then hold encoder ranks only. `nodes` counts the GPU nodes.
    cpu_node_cores: int = 0
    subconductors: str = "auto"     # as --sub-conductors (topology.assign_subconductors)


@dataclass
class Rates:
    """Calibrated costs (calibration.py says where each comes from)."""
    tokenizer_tokens_per_s: float           # one tokenizer rank (one core), all cores of the node busy
    gpu_tokens_per_s: float                 # one encoder rank, in the job (role loop included)
    tokens_per_text: float
    bytes_per_token: float                  # a packed token batch, ids and offsets
    local_latency_s: float                  # a message within a node (MPI shared memory)
    local_bytes_per_s: float
    net_latency_s: float                    # a message between nodes
    nic_bytes_per_s: float                  # per NIC direction
    conductor_message_s: float              # MPI receive, unpickle and dispatch of one message, on this machine
    cpu_slowdown: float                     # the target node's core is this many times slower than this one's
    # What a real control rank spends per message over what the simulation charges for it, from fan-in rehearsals
    # (bench/fanin_cost.py; `hpcembed scaling simulate --conductor-cost`): rank 0 alone, and rank 0 taking
    # sub-conductors' batches. 1.0: the handler time alone, as before that was measured.
    conductor_factor: float = 1.0
    batched_conductor_factor: float = 1.0
    # Seconds added to each batch's charge at rank 0 (the factor then a ratio on it), where how the cost grows with
    # a batch's size was measured (bench/commit_batch_cost.py): fan-in's gap is per message, not per unit. Seconds
    # of the projections' target core, charged unscaled (bench/fanin_cost.py --core-probe/--target-probe scales a
    # rehearsal made on another machine to it).
    batched_conductor_extra_s: float = 0.0
    # probe.py's workload on the target node's core (bench/control_probe.py; `simulate --control-probe`). Handler
    # times measured where the simulation runs are scaled by it over the same probe there; 0: by cpu_slowdown.
    control_probe_s: float = 0.0


@dataclass
class JobShape:
    rows_per_node: int = 0                  # weak scaling: the corpus grows with the nodes
    rows: int = 0                           # strong scaling / one measured run: this many rows in all
    unit_rows: int = 50_000
    unit_sizes: list[list[int]] | None = None  # a measured run's units, [rows, count] runs (manifest settings)
    chunk_rows: int = 1024
    # Tokenizer batches: cut to this many tokens (batching.BatchAssembler, as jobs send them since 0.3), or 0 for
    # one batch per chunk of chunk_rows rows (as runs measured before 0.3 sent them).
    tokenizer_batch_tokens: int = 0
    credits: int = 4
    max_batch_tokens: int = 262144          # one encoder batch (config.default_batch_tokens: cuda 262144, cpu 2048)
    window_batches: int = 8                 # the encoder rank's window, in encoder batches (protocol/encoder.py)
    instances: int = 2                      # encoder instances per encoder rank; each queues 2 batches (InstancePool)
    # Tail stealing (protocol/stealing.py): the least rows each half of a split keeps; 0, as in runs measured
    # before it was built, for none.
    steal_rows: int = 0
    # Batches a tokenizer rank keeps before its first grant (protocol/tokenizer.py); 0, as in runs measured before
    # session 20, for none.
    read_ahead_batches: int = 0
    # Seconds the tokenizer ranks start before the encoder ranks are ready: in every measured run they get units
    # and read while the encoder ranks load the model, and the clock (the job's makespan) starts with the encoder
    # ranks. 0: every rank starts at 0. A replay with measured start offsets uses those instead.
    encoder_lead_s: float = 0.0


@dataclass
class SimResult:
    nodes: int
    encoder_ranks: int
    tokenizer_ranks: int
    rows: int
    tokens: int
    units: int
    makespan_s: float                       # virtual seconds from the first request to the last commit
    throughput_texts_per_s: float           # rows / makespan (what a manifest's steady_texts_per_s measures)
    steady_texts_per_s: float               # in the window where every tokenizer and encoder rank has work
    tail_s: float                           # from the first tokenizer running out of work to the last commit
    conductor_busy: float                   # fraction of the makespan the conductor spent handling messages
    subconductors: int
    subconductor_busy_max: float            # the busiest sub-conductor's fraction of the makespan
    cpu_nodes: int                          # CPU-only tokenizer nodes (the disaggregated shape)
    ramp_s: float                           # from the start to that window's opening
    conductor_messages: int
    conductor_cpu_us_per_message: float     # measured here, before the slowdown
    conductor_queue_max: int
    tokenizer_time: dict[str, float]        # fraction of tokenizer-seconds: tokenizing, waiting for a unit,
                                            # waiting for credit or for the encoder rank to take the batch in,
                                            # idle after the last unit
    gpu_busy: float
    encoder_rows: list[int]                 # rows each encoder rank embedded, in rank order
    remote_batch_fraction: float
    nic_busy_max: float                     # the busiest NIC direction, fraction of the makespan
    wall_seconds: float
    # type -> [messages, CPU µs each, the longest one's µs], here: the longest tells one slow handler from all slower
    conductor_us_by_message: dict = field(default_factory=dict)


class _Delivery(simpy.Event):
    """A message landing: a SimPy event scheduled `delay` from now with its one callback, made with less than a
    Timeout's checks (a 1000-node run schedules tens of millions)."""

    def __init__(self, env: simpy.Environment, delay: float, value, callback):
        self.env, self.callbacks, self._value, self._ok = env, [callback], value, True
        env.schedule(self, simpy.events.NORMAL, delay)


class Rendezvous(simpy.Event):
    """A batch sender's wait for its data to land, which the network fires as the delivery itself
    (SimNetwork.land): one event where a delivery and a wake-up were two."""

    def fire_in(self, delay: float, value, callback) -> None:
        self._value, self._ok = value, True
        self.callbacks.append(callback)
        self.env.schedule(self, simpy.events.NORMAL, delay)


class SimNetwork:
    """Delivers messages in virtual time (see the module docstring for the model)."""

    def __init__(self, env: simpy.Environment, rates: Rates, host_of: list[int], ideal: bool = False):
        self.env, self.rates, self.host_of, self.ideal = env, rates, host_of, ideal
        self.inbox: list[deque] = [deque() for _ in host_of]
        self.waiting: list[simpy.Event | None] = [None] * len(host_of)
        # A rank driven by its mail alone (an encoder rank): called as each message lands, in place of waking a
        # process that waits for mail.
        self.handlers: list = [None] * len(host_of)
        # A rank that reads its mail only when it looks (a tokenizer rank, between batches): what is posted to it
        # waits here, (arrival, order posted, envelope), with no event of its own unless the rank is waiting for
        # mail (a third of a run's deliveries were credits to a tokenizer rank busy tokenizing).
        self.unread: list[list | None] = [None] * len(host_of)
        self.wake_at: list[float] = [float("inf")] * len(host_of)
        self._posted = itertools.count()
        hosts = max(host_of) + 1
        self.egress_free = [0.0] * hosts
        self.ingress_free = [0.0] * hosts
        self.nic_busy = [0.0] * hosts
        self.batches = self.remote_batches = 0

    def read_when_looking(self, rank: int) -> None:
        """`rank` takes its mail through `collect` and `wait` only (see `unread`)."""
        self.unread[rank] = []

    def post(self, source: int, dest: int, message: Any, nbytes: int, depart: float = 0.0) -> None:
        delay = self._delay(source, dest, nbytes, depart)
        unread = self.unread[dest]
        if unread is None:
            _Delivery(self.env, delay, (dest, Envelope(source, message)), self._deliver)
            return
        arrival = self.env.now + delay
        heapq.heappush(unread, (arrival, next(self._posted), Envelope(source, message)))
        if self.waiting[dest] is not None and arrival < self.wake_at[dest]:
            self._wake(dest, arrival)

    def collect(self, rank: int) -> deque:
        """`rank`'s inbox, with what has arrived by now of its unread mail moved in, in the order it arrived."""
        box, unread = self.inbox[rank], self.unread[rank]
        if unread:
            now = self.env.now
            while unread and unread[0][0] <= now:
                box.append(heapq.heappop(unread)[2])
        return box

    def _wake(self, rank: int, at: float) -> None:
        self.wake_at[rank] = at
        _Delivery(self.env, at - self.env.now, rank, self._woken)

    def _woken(self, event) -> None:
        """A rank that reads when it looks, waiting for mail, at the time its first unread message arrives."""
        rank = event.value
        if self.wake_at[rank] <= self.env.now:
            self.wake_at[rank] = float("inf")
        waiter = self.waiting[rank]
        if waiter is not None and self.collect(rank):
            self.waiting[rank] = None
            waiter.succeed()

    def land(self, event: "Rendezvous", source: int, dest: int, message: Any, nbytes: int) -> None:
        """Post `message` and fire `event` when it lands, as one event: `event` (a sender's wait for its
        rendezvous to complete) is the delivery itself, its waiters resumed as the message is handed over."""
        event.fire_in(self._delay(source, dest, nbytes, 0.0), (dest, Envelope(source, message)), self._deliver)

    def _delay(self, source: int, dest: int, nbytes: int, depart: float) -> float:
        """From now until a message of `nbytes` posted `depart` from now lands, its NIC time booked."""
        r = self.rates
        if self.ideal:
            return depart
        if self.host_of[source] == self.host_of[dest]:
            return depart + r.local_latency_s + nbytes / r.local_bytes_per_s
        a, b = self.host_of[source], self.host_of[dest]
        now = self.env.now
        # Two queues in tandem, not one slot held on both NICs at once: the sender's egress takes the message when
        # it is free, and the receiver's ingress from then on when it is free (cut-through: it may start as the
        # egress does). Holding the egress until the ingress was free chained hosts together at scale
        # (bench/notes/scale_out.md, session 22).
        transfer = nbytes / r.nic_bytes_per_s
        leaves = max(now + depart, self.egress_free[a])
        self.egress_free[a] = leaves + transfer
        start = max(leaves, self.ingress_free[b])
        done = self.ingress_free[b] = start + transfer
        self.nic_busy[b] += transfer
        return done + r.net_latency_s - now

    def _deliver(self, event) -> None:
        dest, envelope = event.value
        self._put(dest, envelope)

    def _put(self, rank: int, envelope: Envelope) -> None:
        self.inbox[rank].append(envelope)
        handler = self.handlers[rank]
        if handler is not None:
            handler()
            return
        waiter = self.waiting[rank]
        if waiter is not None:
            self.waiting[rank] = None
            waiter.succeed()

    def notify(self, rank: int, message: Any) -> None:
        """Something within the rank itself (an encoder finished): wake its loop now."""
        self._put(rank, Envelope(rank, message))

    def wait(self, rank: int):
        """A SimPy event that fires when `rank` has mail (at once if it has)."""
        if self.collect(rank):
            return self.env.timeout(0)
        event = self.waiting[rank] = self.env.event()
        unread = self.unread[rank]
        if unread and unread[0][0] < self.wake_at[rank]:
            self._wake(rank, unread[0][0])
        return event


@dataclass
class Landed:
    """A batch's data has reached the encoder rank (the rendezvous is done). It holds the batch, not the request:
    the request holds the Rendezvous that carries this message, and that cycle left every batch's events for the
    cycle collector (bench/notes/scale_out.md, session 24)."""
    batch: "SimBatch"


@dataclass
class StepDone:
    """An encoder batch finished (wakes the encoder rank's loop)."""


@dataclass
class SendRequest:
    """The rendezvous request of a batch send; `done` fires when the encoder rank has received the data."""
    batch: "SimBatch"
    done: Rendezvous


@dataclass
class SimBatch:
    """What travels in place of a TokenBatch: its size and whose rows it holds."""
    unit: int
    num_rows: int
    num_tokens: int
    nbytes: int


class EncoderInstances:
    """An encoder rank's instances as one server at the calibrated in-job rate, for sim.Simulation (`sim`, whose
    counters it adds to and whose `post` sends the rank's messages) and the rank's EncoderCore: a step submitted
    ends at a time known then, so it is one scheduled event, not a process and a queue."""

    def __init__(self, sim, rank: int, core, state: dict, post):
        self.sim, self.rank, self.core, self.state, self.post = sim, rank, core, state, post
        self.free_at = 0.0
        self.left: dict[int, int] = {}            # id(batch) -> tokens not yet encoded
        self.submitted = 0                        # encoder steps

    def submit(self, step: list) -> None:
        sim = self.sim
        busy = sum(tokens for _, tokens in step) / sim.rates.gpu_tokens_per_s
        self.submitted += 1
        sim.gpu_busy += busy
        self.free_at = max(sim.env.now, self.free_at) + busy
        sim.env.timeout(self.free_at - sim.env.now, step).callbacks.append(self._done)

    def _done(self, event) -> None:
        sim, core = self.sim, self.core
        for batch, tokens in event.value:
            remaining = self.left.get(id(batch), batch.num_tokens) - tokens
            if remaining:
                self.left[id(batch)] = remaining
                continue
            self.left.pop(id(batch), None)
            sim.encoded_rows += batch.num_rows
            sim.encoded_rows_of[self.rank] += batch.num_rows
            if core.embedded(batch.unit, batch.num_rows, batch.num_tokens):
                self.post(self.rank, [core.written(batch.unit, shard_name(batch.unit, self.rank))])
        self.state["in_flight"] -= 1
        sim.net.notify(self.rank, StepDone())
