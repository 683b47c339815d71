"""A discrete-event simulation (SimPy) of one hpcembed job at any number of nodes, in virtual time.

What runs is the project's own code wherever the question is how the job schedules and routes:
  - the roles come from world.plan_roles and world.plan_tokenizers (the rate plan), on synthetic RankInfo;
  - rank 0 is the real Conductor (roles/conductor.py) with a real Ledger in a temporary directory. Each
    message it handles is timed on this machine's CPU, scaled to the target node's core, and charged to it in
    virtual time before its replies leave, so its queue at 1,000 nodes comes from the code that would run;
  - every tokenizer rank is a real TokenizerRole: its credit accounting, its routing (`_pick_gpu`, with the
    RoleMap's sparse links) and the UnitEnd/UnitRead messages it sends are the real ones.
What is modelled: the time a tokenizer core takes per batch and a gpu rank per token (calibrated rates), and the
network. Messages go through SimTransport, whose send() schedules the delivery: within a node after the
measured shared-memory latency and bandwidth; between nodes through each host's NIC, one FIFO queue per
direction (egress of the sender, ingress of the receiver) at the NIC's bandwidth, plus the link latency. Flows
that share a NIC therefore share its bandwidth, and a NIC that many senders target (incast) queues them. The
fabric between NICs is taken as non-blocking (a full fat tree), as InfiniBand clusters are built.

A token batch moves as the MPI transport moves it, by rendezvous: the tokenizer's Send completes only when the
gpu rank takes the batch in, which it does while its token-budget window has room. A gpu rank's encoders are one
server at its measured in-job rate, fed encoder batches of max_batch_tokens (2 queued per instance); a credit goes
back for each batch whose tokens were submitted, and PartWritten once every row of a unit sent there is embedded.
"""
from __future__ import annotations

import math
from itertools import accumulate
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import simpy

from ..io.ledger import Ledger, LedgerState
from ..io.sources import InputFile, Plan, WorkUnit
from ..io.writer import OutputDir
from ..progress import Progress
from ..roles.common import RoleMap
from ..roles.conductor import Conductor
from ..roles.messages import Credit, PartWritten, RequestUnit, UnitEnd, UnitRead
from ..roles.tokenizer import TokenizerRole, _UnitProgress
from ..signals import StopRequest
from ..transport.base import Envelope, Transport
from ..world import RankInfo, plan_roles, plan_tokenizers

CONTROL_BYTES = 256            # a pickled control message, rounded up


@dataclass
class NodeShape:
    """One node of the simulated cluster: what srun would start there (one rank per core)."""
    cores: int = 16
    gpus: int = 1
    gpu_name: str = "NVIDIA H100 80GB HBM3"
    tokenizers: int = 0         # 0: as the rate plan decides (world.plan_tokenizers); else exactly this many


@dataclass
class Rates:
    """Calibrated costs (calibration.py says where each comes from)."""
    tokenizer_tokens_per_s: float           # one tokenizer rank (one core), all cores of the node busy
    gpu_tokens_per_s: float                 # one gpu rank, in the job (role loop included)
    tokens_per_text: float
    bytes_per_token: float                  # a packed token batch, ids and offsets
    local_latency_s: float                  # a message within a node (MPI shared memory)
    local_bytes_per_s: float
    net_latency_s: float                    # a message between nodes
    nic_bytes_per_s: float                  # per NIC direction
    conductor_message_s: float              # MPI receive, unpickle and dispatch of one message, on this machine
    cpu_slowdown: float                     # the target node's core is this many times slower than this one's


@dataclass
class JobShape:
    rows_per_node: int = 0                  # weak scaling: the corpus grows with the nodes
    rows: int = 0                           # strong scaling / one measured run: this many rows in all
    unit_rows: int = 50_000
    unit_sizes: list[list[int]] | None = None  # a measured run's units, [rows, count] runs (manifest settings)
    chunk_rows: int = 1024
    credits: int = 4
    max_batch_tokens: int = 262144          # one encoder batch (config.default_batch_tokens: cuda 262144, cpu 2048)
    window_batches: int = 8                 # the gpu rank takes batches in while its window is below this many
    instances: int = 2                      # encoder instances per gpu rank; each queues 2 batches (InstancePool)


@dataclass
class SimResult:
    nodes: int
    gpu_ranks: int
    tokenizer_ranks: int
    rows: int
    tokens: int
    units: int
    makespan_s: float                       # virtual seconds from the first request to the last commit
    throughput_texts_per_s: float           # rows / makespan (what a manifest's steady_texts_per_s measures)
    steady_texts_per_s: float               # in the window where every tokenizer has work (no ramp, no tail)
    tail_s: float                           # from the first tokenizer running out of work to the last commit
    conductor_busy: float                   # fraction of the makespan the conductor spent handling messages
    conductor_messages: int
    conductor_cpu_us_per_message: float     # measured here, before the slowdown
    conductor_queue_max: int
    tokenizer_time: dict[str, float]        # fraction of tokenizer-seconds: tokenizing, waiting for a unit,
                                            # waiting for credit or for the gpu rank to take the batch in, idle after
                                            # the last unit
    gpu_busy: float
    gpu_rows: list[int]                     # rows each gpu rank embedded, in rank order
    remote_batch_fraction: float
    nic_busy_max: float                     # the busiest NIC direction, fraction of the makespan
    wall_seconds: float


class SimNetwork:
    """Delivers messages in virtual time (see the module docstring for the model)."""

    def __init__(self, env: simpy.Environment, rates: Rates, host_of: list[int], ideal: bool = False):
        self.env, self.rates, self.host_of, self.ideal = env, rates, host_of, ideal
        self.inbox: list[deque] = [deque() for _ in host_of]
        self.waiting: list[simpy.Event | None] = [None] * len(host_of)
        hosts = max(host_of) + 1
        self.egress_free = [0.0] * hosts
        self.ingress_free = [0.0] * hosts
        self.nic_busy = [0.0] * hosts
        self.batches = self.remote_batches = 0

    def post(self, source: int, dest: int, message: Any, nbytes: int, depart: float = 0.0) -> None:
        now = self.env.now + depart
        r = self.rates
        if self.ideal:
            arrive = now
        elif self.host_of[source] == self.host_of[dest]:
            arrive = now + r.local_latency_s + nbytes / r.local_bytes_per_s
        else:
            a, b = self.host_of[source], self.host_of[dest]
            start = max(now, self.egress_free[a], self.ingress_free[b])
            done = start + nbytes / r.nic_bytes_per_s
            self.egress_free[a] = self.ingress_free[b] = done
            self.nic_busy[b] += done - start
            arrive = done + r.net_latency_s
        event = self.env.timeout(arrive - self.env.now, (dest, Envelope(source, message)))
        event.callbacks.append(self._deliver)

    def _deliver(self, event) -> None:
        dest, envelope = event.value
        self._put(dest, envelope)

    def _put(self, rank: int, envelope: Envelope) -> None:
        self.inbox[rank].append(envelope)
        waiter = self.waiting[rank]
        if waiter is not None:
            self.waiting[rank] = None
            waiter.succeed()

    def notify(self, rank: int, message: Any) -> None:
        """Something within the rank itself (an encoder finished): wake its loop now."""
        self._put(rank, Envelope(rank, message))

    def wait(self, rank: int):
        """A SimPy event that fires when `rank` has mail (at once if it has)."""
        if self.inbox[rank]:
            return self.env.timeout(0)
        event = self.waiting[rank] = self.env.event()
        return event


class SimTransport(Transport):
    name = "sim"

    def __init__(self, network: SimNetwork, rank: int):
        self.net, self.rank, self.size = network, rank, len(network.host_of)
        self.hold = None            # the conductor collects its replies here while its handler runs
        self.sent = None            # the last batch send, done when the gpu rank has taken its data

    def send(self, dest: int, message: Any) -> None:
        if self.hold is not None:
            self.hold.append((dest, message))
        else:
            self.net.post(self.rank, dest, message, CONTROL_BYTES)

    def send_batch(self, dest: int, batch: "SimBatch") -> None:
        """A blocking MPI Send of a batch (transport/mpi.py): far above the eager limit, it moves by rendezvous, so
        it completes only once the gpu rank takes it in, which it does while its window has room. The request
        goes now; the role's process waits on `self.sent` (the data landed) before it goes on."""
        self.net.batches += 1
        self.net.remote_batches += self.net.host_of[self.rank] != self.net.host_of[dest]
        self.sent = self.net.env.event()
        self.net.post(self.rank, dest, SendRequest(batch, self.sent), CONTROL_BYTES)

    def recv(self, timeout: float | None = None) -> Envelope | None:
        box = self.net.inbox[self.rank]
        if box:
            return box.popleft()
        if timeout == 0:
            return None
        raise RuntimeError("the simulation reached a blocking receive: a role loop would wait here; the model "
                           "must wait in virtual time before calling it")

    def abort(self, reason: str, exit_code: int) -> None:
        raise RuntimeError(f"simulated job aborted: {reason}")


@dataclass
class Landed:
    """A batch's data has reached the gpu rank (the rendezvous is done)."""
    request: "SendRequest"


@dataclass
class StepDone:
    """An encoder batch finished (wakes the gpu rank's loop)."""


@dataclass
class SendRequest:
    """The rendezvous request of a batch send; `done` fires when the gpu rank has received the data."""
    batch: "SimBatch"
    done: simpy.Event


@dataclass
class SimBatch:
    """What travels in place of a TokenBatch: its size and whose rows it holds."""
    unit: int
    num_rows: int
    num_tokens: int
    nbytes: int


def build_world(nodes: int, shape: NodeShape, rates: Rates) -> tuple[RoleMap, list[int]]:
    """The role map the real planning code makes for `nodes` nodes of `shape`, and each rank's node."""
    ranks, host_of = [], []
    for n in range(nodes):
        for local in range(shape.cores):
            ranks.append(RankInfo(len(ranks), f"node{n}", local, shape.gpus, shape.gpus, None, shape.cores,
                                  shape.gpu_name))
            host_of.append(n)
    roles = plan_roles(ranks, None)
    if shape.tokenizers:
        keep = []
        for n in range(nodes):
            keep += [t for t in roles.tokenizers if host_of[t] == n][: shape.tokenizers]
        roles = RoleMap(roles.conductor, sorted(keep), roles.gpus, roles.hosts)
    else:
        roles, _ = plan_tokenizers(roles, ranks, rates.tokenizer_tokens_per_s, rates.gpu_tokens_per_s)
    return roles, host_of


class Simulation:
    def __init__(self, nodes: int, shape: NodeShape, job: JobShape, rates: Rates, ideal_network: bool = False,
                 free_conductor: bool = False, workdir: str | None = None,
                 start_offsets: dict[str, list[float]] | None = None):
        """`start_offsets`: a measured run's start-up skew, {"gpu": [...], "tokenizer": [...]} in rank order,
        seconds after the first gpu rank was ready (measure.py); each rank starts at its offset. Without them
        every rank starts at 0, as in a long job the skew does not matter."""
        self.nodes, self.shape, self.job, self.rates = nodes, shape, job, rates
        self.free_conductor = free_conductor
        self.env = simpy.Environment()
        self.roles, self.host_of = build_world(nodes, shape, rates)
        self.net = SimNetwork(self.env, rates, self.host_of, ideal=ideal_network)
        rows = job.rows or job.rows_per_node * nodes
        file = InputFile(0, "simulated-corpus.jsonl", "jsonl")
        if job.unit_sizes:
            sizes = [size for size, count in job.unit_sizes for _ in range(count)]
            if sum(sizes) != rows:
                raise ValueError(f"the unit sizes add up to {sum(sizes)} rows, the job has {rows}")
        else:
            sizes = [min(job.unit_rows, rows - start) for start in range(0, rows, job.unit_rows)]
        starts = [0, *accumulate(sizes[:-1])]
        units = [WorkUnit(u, file, start, start + size) for u, (start, size) in enumerate(zip(starts, sizes))]
        self.plan = Plan([file], {0: rows}, units, [])
        self._tmp = tempfile.TemporaryDirectory(dir=workdir)
        out = OutputDir(self._tmp.name)
        ledger = Ledger(Path(self._tmp.name))
        self.conductor = Conductor(SimTransport(self.net, 0), self.roles, self.plan, out,
                                   Progress(rows, mode="none"), ledger, LedgerState({}, [], {}),
                                   stop=StopRequest())
        # The clock starts with the first rank to start; the measured window (and the throughput) with the first
        # gpu rank to be ready, `self.origin` later. Tokenizers often start first: they ask for units and read
        # while the gpu ranks still load, and the order they ask in decides who holds which unit.
        offsets = start_offsets or {}
        given = {role: offsets.get(role) or [] for role in ("gpu", "tokenizer")}
        earliest = min([0.0] + given["gpu"] + given["tokenizer"])
        self.origin = -earliest
        self.start_at = {}
        for role, ranks in (("gpu", self.roles.gpus), ("tokenizer", self.roles.tokenizers)):
            if given[role] and len(given[role]) != len(ranks):
                raise ValueError(f"{len(given[role])} {role} start offsets for {len(ranks)} {role} ranks")
            self.start_at.update({rank: o - earliest for rank, o in zip(ranks, given[role])})
        self.done = self.env.event()
        # Accounting
        self.conductor_busy = 0.0
        self.conductor_cpu = 0.0
        self.conductor_messages = 0
        self.queue_max = 0
        self.tok_time = {"tokenizing": 0.0, "waiting_for_unit": 0.0, "waiting_for_credit": 0.0}
        self.gpu_busy = 0.0
        self.first_idle: float | None = None        # a tokenizer has finished its last unit: the tail begins
        self.all_started: float | None = None
        self.started = 0
        self.window_rows_at: dict[str, tuple[float, int]] = {}
        self.gpu_rows = 0
        self.gpu_rows_of = {g: 0 for g in self.roles.gpus}

    # --- rank 0 -----------------------------------------------------------------------------------------
    def _conductor(self):
        net, t = self.net, self.conductor.t
        box = net.inbox[0]
        clock = time.perf_counter
        while True:
            if not box:
                yield net.wait(0)
                continue
            self.queue_max = max(self.queue_max, len(box))
            env_ = box.popleft()
            t.hold = []
            start = clock()
            self.conductor._handle(env_.source, env_.message)
            spent = clock() - start
            replies, t.hold = t.hold, None
            self.conductor_messages += 1
            self.conductor_cpu += spent
            charge = 0.0 if self.free_conductor else (spent + self.rates.conductor_message_s) * self.rates.cpu_slowdown
            for dest, message in replies:
                net.post(0, dest, message, CONTROL_BYTES, depart=charge)
            if len(self.conductor.done) == len(self.plan.units):
                self.done.succeed()
                return
            if charge:
                self.conductor_busy += charge
                yield self.env.timeout(charge)

    # --- tokenizer ranks --------------------------------------------------------------------------------
    def _tokenizer(self, rank: int):
        env, net, job, r = self.env, self.net, self.job, self.rates
        t = SimTransport(net, rank)
        role = TokenizerRole(t, self.roles, backend=None, columns=None, chunk_rows=job.chunk_rows,
                             skip_invalid=False)
        if self.start_at.get(rank):
            yield env.timeout(self.start_at[rank])
        t.send(self.roles.conductor, RequestUnit())
        first = True
        while True:
            t0 = env.now
            while not role.assigned and not role.no_more:
                yield net.wait(rank)
                role._receive(0)
            self.tok_time["waiting_for_unit"] += env.now - t0
            if not role.assigned:
                if self.first_idle is None:
                    self.first_idle = env.now
                return
            if first:
                first = False
                self.started += 1
                if self.started == len(self.roles.tokenizers):
                    self.all_started = env.now
            unit = role.assigned.popleft()
            t.send(self.roles.conductor, RequestUnit())
            progress = _UnitProgress()
            for start in range(unit.row_start, unit.row_stop, job.chunk_rows):
                rows = min(job.chunk_rows, unit.row_stop - start)
                tokens = int(round(rows * r.tokens_per_text))
                busy = tokens / r.tokenizer_tokens_per_s
                self.tok_time["tokenizing"] += busy
                yield env.timeout(busy)
                t0 = env.now
                while not any(c > 0 for c in role.credits.values()):
                    while not net.inbox[rank]:
                        yield net.wait(rank)
                    role._receive(0)
                self.tok_time["waiting_for_credit"] += env.now - t0
                # The real routing: most free credit, staying with the previous gpu on ties.
                role._deliver(unit, SimBatch(unit.unit, rows, tokens, int(tokens * r.bytes_per_token)), progress)
                t0 = env.now
                yield t.sent
                self.tok_time["waiting_for_credit"] += env.now - t0
                progress.tokens += tokens
                role.rows += rows
            role.tokens += progress.tokens
            role._unit_done(unit, progress)
            t.send(self.roles.conductor, UnitRead(unit.unit, progress.sent, progress.tokens, [], 0))

    # --- gpu ranks --------------------------------------------------------------------------------------
    def _gpu(self, rank: int):
        """The gpu rank's loop (roles/gpu.py) and its encoders. The loop takes a batch in (completing its
        sender's rendezvous) while the token-budget window holds less than window_batches x max_batch_tokens;
        it submits encoder batches of up to max_batch_tokens while the instances have queue room (2 each), and
        hands back one Credit per batch whose tokens it has submitted, oldest first. The encoders are one
        server at the rank's measured in-job rate."""
        env, net, r, job = self.env, self.net, self.rates, self.job
        t = SimTransport(net, rank)
        if self.start_at.get(rank):
            yield env.timeout(self.start_at[rank])
        for tokenizer in self.roles.tokenizers_of(rank):
            t.send(tokenizer, Credit(job.credits))
        window_cap = job.max_batch_tokens * job.window_batches
        depth = 2 * job.instances
        requests: deque = deque()                 # (source, SendRequest) not yet taken in
        window: deque = deque()                   # [batch, tokens not yet submitted], landed
        state = {"incoming": 0, "in_flight": 0}   # tokens being transferred in; encoder batches submitted
        waiting_tokens = 0                        # landed and not yet submitted
        owed: deque = deque()                     # (tokenizer, tokens) in arrival order
        consumed = 0
        left: dict[int, int] = {}                 # id(batch) -> tokens not yet encoded
        steps = simpy.Store(env)
        parts: dict[int, list[int]] = {}          # unit -> [rows expected (or -1), rows embedded, tokens]

        def finish_if_complete(unit: int) -> None:
            part = parts[unit]
            if part[0] == part[1]:
                t.send(self.roles.conductor, PartWritten(unit, f"part-{unit:06d}-r{rank:05d}.parquet",
                                                         part[1], part[2]))
                del parts[unit]

        def encoder():
            while True:
                step = yield steps.get()
                busy = sum(tokens for _, tokens in step) / r.gpu_tokens_per_s
                self.gpu_busy += busy
                yield env.timeout(busy)
                for batch, tokens in step:
                    left[id(batch)] -= tokens
                    if left[id(batch)] == 0:
                        del left[id(batch)]
                        self.gpu_rows += batch.num_rows
                        self.gpu_rows_of[rank] += batch.num_rows
                        part = parts.setdefault(batch.unit, [-1, 0, 0])
                        part[1] += batch.num_rows
                        part[2] += batch.num_tokens
                        finish_if_complete(batch.unit)
                state["in_flight"] -= 1
                net.notify(rank, StepDone())

        env.process(encoder())
        while True:
            while net.inbox[rank]:
                envelope = t.recv(0)
                message = envelope.message
                if isinstance(message, SendRequest):
                    requests.append((envelope.source, message))
                elif isinstance(message, Landed):
                    batch = message.request.batch
                    state["incoming"] -= batch.num_tokens
                    window.append([batch, batch.num_tokens])
                    waiting_tokens += batch.num_tokens
                    left[id(batch)] = batch.num_tokens
                    owed.append((envelope.source, batch.num_tokens))
                    message.request.done.succeed()
                elif isinstance(message, UnitEnd):
                    parts.setdefault(message.unit, [-1, 0, 0])[0] = message.rows
                    finish_if_complete(message.unit)
            # Take batches in while the window has room: the sender's Send completes when the data lands.
            while requests and waiting_tokens + state["incoming"] < window_cap:
                source, request = requests.popleft()
                state["incoming"] += request.batch.num_tokens
                net.post(source, rank, Landed(request), request.batch.nbytes)
            # Submit encoder batches while the instances have room; credits go back as tokens are submitted.
            while window and state["in_flight"] < depth:
                step, budget = [], job.max_batch_tokens
                while window and budget > 0:
                    entry = window[0]
                    take = min(entry[1], budget)
                    step.append((entry[0], take))
                    entry[1] -= take
                    budget -= take
                    if entry[1] == 0:
                        window.popleft()
                taken = sum(tokens for _, tokens in step)
                waiting_tokens -= taken
                state["in_flight"] += 1
                steps.put(step)
                consumed += taken
                while owed and consumed >= owed[0][1]:
                    consumed -= owed[0][1]
                    t.send(owed.popleft()[0], Credit(1))
                if not window:                    # nothing waiting: settle the rounding, as the real loop does
                    while owed:
                        t.send(owed.popleft()[0], Credit(1))
                    consumed = 0
            yield net.wait(rank)

    def _sampler(self):
        """Rows embedded at the times the steady window opens and closes."""
        while self.all_started is None:
            yield self.env.timeout(0.05)
        self.window_rows_at["open"] = (self.env.now, self.gpu_rows)
        while self.first_idle is None:
            yield self.env.timeout(0.05)
        self.window_rows_at["close"] = (self.env.now, self.gpu_rows)

    def run(self) -> SimResult:
        wall = time.perf_counter()
        env = self.env
        env.process(self._conductor())
        for g in self.roles.gpus:
            env.process(self._gpu(g))
        for tk in self.roles.tokenizers:
            env.process(self._tokenizer(tk))
        env.process(self._sampler())
        env.run(until=self.done)
        makespan = env.now - self.origin
        self.conductor.ledger.close()
        self._tmp.cleanup()
        rows = self.plan.total_rows
        steady = rows / makespan
        if "open" in self.window_rows_at and "close" in self.window_rows_at:
            (t0, r0), (t1, r1) = self.window_rows_at["open"], self.window_rows_at["close"]
            if t1 - t0 > 0:
                steady = (r1 - r0) / (t1 - t0)
        n_tok = len(self.roles.tokenizers)
        total_tok = n_tok * makespan
        tok = {k: v / total_tok for k, v in self.tok_time.items()}
        tok["idle_after_last_unit"] = max(0.0, 1.0 - sum(tok.values()))
        return SimResult(
            nodes=self.nodes, gpu_ranks=len(self.roles.gpus), tokenizer_ranks=n_tok, rows=rows,
            tokens=int(round(rows * self.rates.tokens_per_text)), units=len(self.plan.units),
            makespan_s=makespan, throughput_texts_per_s=rows / makespan, steady_texts_per_s=steady,
            tail_s=env.now - (self.first_idle or env.now), conductor_busy=self.conductor_busy / makespan,
            conductor_messages=self.conductor_messages,
            conductor_cpu_us_per_message=1e6 * self.conductor_cpu / max(self.conductor_messages, 1),
            conductor_queue_max=self.queue_max, tokenizer_time=tok,
            gpu_busy=self.gpu_busy / (len(self.roles.gpus) * makespan),
            gpu_rows=[self.gpu_rows_of[g] for g in self.roles.gpus],
            remote_batch_fraction=self.net.remote_batches / max(self.net.batches, 1),
            nic_busy_max=max(self.net.nic_busy) / makespan if self.net.nic_busy else 0.0,
            wall_seconds=time.perf_counter() - wall)


def simulate(nodes: int, shape: NodeShape, job: JobShape, rates: Rates, **kw) -> SimResult:
    return Simulation(nodes, shape, job, rates, **kw).run()


def units_for(nodes: int, shape: NodeShape, rates: Rates, units_per_tokenizer: float, unit_rows: int) -> int:
    """Rows per node for a weak-scaling run in which each tokenizer rank reads about `units_per_tokenizer`."""
    roles, _ = build_world(1, shape, rates)
    return int(math.ceil(len(roles.tokenizers) * units_per_tokenizer)) * unit_rows
