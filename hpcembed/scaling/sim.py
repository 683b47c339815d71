"""A discrete-event simulation (SimPy) of one hpcembed job at any number of nodes, in virtual time.

It is a driver of the project's own protocol cores, as roles/ is in real time; it models time, never protocol:
  - the roles come from topology.plan_roles and topology.plan_tokenizers (the rate plan), on synthetic RankInfo;
  - rank 0 runs the real ConductorCore with a real Ledger in a temporary directory. Each message it handles is
    timed on this machine's CPU, scaled to the target node's core, and charged to it in virtual time before its
    replies leave, so its queue at 1,000 nodes comes from the code that would run;
  - every tokenizer rank runs a real TokenizerCore (units, credits, routing over the RoleMap's sparse links, the
    UnitEnd/UnitRead messages), and every encoder rank a real EncoderCore (the window rule, the credit rule, the
    part-complete rule, PartWritten).
What is modelled (model.py): the time a tokenizer core takes per batch and an encoder rank per token (calibrated
rates), and the network.

A token batch moves as the MPI transport moves it, by rendezvous: the tokenizer's Send completes only when the
encoder rank takes the batch in, which it does while its core's window has room. An encoder rank's instances are
one server at its measured in-job rate, fed encoder batches of max_batch_tokens (2 queued per instance).
"""
from __future__ import annotations

import pickle
import tempfile
import time
from collections import deque

import simpy

from ..heap import collector_for_a_large_heap
from ..io.ledger import LedgerState
from ..io.sources import WorkUnit
from ..io.writer import OutputDir, shard_name
from ..protocol.conductor import ConductorCore
from ..protocol.encoder import EncoderCore
from ..protocol.messages import RequestUnit, Send
from ..protocol.tokenizer import TokenizerCore, UnitProgress
from ..protocol.subconductor import SubConductorCore
from .model import (CONTROL_BYTES, EncoderInstances, JobShape, Landed, NodeShape, Rates, Rendezvous, SendRequest,
                    SimBatch, SimNetwork, SimResult, StepDone)
from .layout import build_world, cpu_nodes_for, unit_plan, units_for
from .probe import HandlerClock, handler_scale

__all__ = ["JobShape", "NodeShape", "Rates", "SimResult", "Simulation", "build_world", "simulate", "units_for"]


class Simulation:
    def __init__(self, nodes: int, shape: NodeShape, job: JobShape, rates: Rates, ideal_network: bool = False,
                 free_conductor: bool = False, workdir: str | None = None,
                 start_offsets: dict[str, list[float]] | None = None):
        """`start_offsets`: a measured run's start-up skew, {"encoder": [...], "tokenizer": [...]} in rank order
        ("gpu" is read as "encoder": studies measured before 0.2), seconds after the first encoder rank was ready
        (measure.py); each rank starts at its offset. Without them the tokenizer ranks start `job.encoder_lead_s`
        before the encoder ranks, all of a role at once."""
        self.nodes, self.shape, self.job, self.rates = nodes, shape, job, rates
        self.free_conductor = free_conductor
        self.env = simpy.Environment()
        self.roles, self.host_of = build_world(nodes, shape, rates)
        self.net = SimNetwork(self.env, rates, self.host_of, ideal=ideal_network)
        for rank in self.roles.tokenizers:       # they look at their mail between batches (_take_all)
            self.net.read_when_looking(rank)
        self.plan = unit_plan(job, job.rows or job.rows_per_node * nodes)
        self._tmp = tempfile.TemporaryDirectory(dir=workdir)
        output = OutputDir(self._tmp.name)
        self.conductor = ConductorCore(self.roles, self.plan, output, output.ledger(), LedgerState({}, [], {}),
                                       steal_rows=job.steal_rows)
        self.conductor.ledger.clock = lambda: self.env.now
        self.subconductors = {s: SubConductorCore(s, self.roles, steal_rows=job.steal_rows)
                              for s in self.roles.subconductors}
        self.subconductor_busy = {s: 0.0 for s in self.subconductors}
        self._rank0_factor = rates.batched_conductor_factor if self.subconductors else rates.conductor_factor
        self._rank0_extra = rates.batched_conductor_extra_s if self.subconductors else 0.0
        self.handler_scale = handler_scale(rates.control_probe_s, rates.cpu_slowdown)
        self.handler_clock = HandlerClock(RequestUnit())
        if start_offsets is None and job.encoder_lead_s:
            start_offsets = {"tokenizer": [-job.encoder_lead_s] * len(self.roles.tokenizers),
                             "encoder": [0.0] * len(self.roles.encoders)}
        self._start_offsets(start_offsets or {})
        self.done = self.env.event()
        # Accounting
        self.conductor_busy = self.conductor_cpu = 0.0
        self.conductor_messages = self.queue_max = 0
        self.conductor_cpu_by: dict[str, list] = {}     # type -> [messages, CPU s, the longest's], here
        self.tok_time = {"tokenizing": 0.0, "waiting_for_unit": 0.0, "waiting_for_credit": 0.0}
        self.gpu_busy = 0.0
        self.first_idle: float | None = None        # a tokenizer has finished its last unit: the tail begins
        self.all_started: float | None = None
        self.started = 0
        self.encoders_working = 0                   # encoder ranks that have submitted their first step
        self.window_rows_at: dict[str, tuple[float, int]] = {}
        self.encoded_rows = 0
        self.encoded_rows_of = {e: 0 for e in self.roles.encoders}

    def _start_offsets(self, offsets: dict[str, list[float]]) -> None:
        """The clock starts with the first rank to start; the measured window (and the throughput) with the first
        encoder rank to be ready, `self.origin` later. Tokenizers often start first: they ask for units and read
        while the encoder ranks still load, and the order they ask in decides who holds which unit."""
        given = {"encoder": offsets.get("encoder") or offsets.get("gpu") or [],
                 "tokenizer": offsets.get("tokenizer") or []}
        earliest = min([0.0] + given["encoder"] + given["tokenizer"])
        self.origin = -earliest
        self.start_at: dict[int, float] = {}
        for role, ranks in (("encoder", self.roles.encoders), ("tokenizer", self.roles.tokenizers)):
            if given[role] and len(given[role]) != len(ranks):
                raise ValueError(f"{len(given[role])} {role} start offsets for {len(ranks)} {role} ranks")
            self.start_at.update({rank: o - earliest for rank, o in zip(ranks, given[role])})

    def post_sends(self, source: int, sends: list[Send], depart: float = 0.0) -> None:
        """A core's control messages, each leaving `depart` from now."""
        for dest, message in sends:
            self.net.post(source, dest, message, CONTROL_BYTES, depart=depart)

    def _take_all(self, rank: int, core) -> None:
        """Hand every message waiting for `rank` to its core (a tokenizer's replies are none)."""
        box = self.net.collect(rank)
        while box:
            envelope = box.popleft()
            self.post_sends(rank, core.handle(envelope.source, envelope.message))

    # --- rank 0 and the sub-conductors ----------------------------------------------------------------
    def _handled(self, message, handle) -> tuple[list[Send], float]:
        """A control rank's handler run on `message`: its replies, and the CPU it took here (probe.HandlerClock:
        the handler, and the pickling beyond a small message's that the MPI transport would do)."""
        return self.handler_clock.run(pickle.dumps(message), lambda _: handle())

    def _charge(self, spent: float, factor: float, extra: float = 0.0) -> float:
        """A control rank's virtual time for a message: its handler's time here on the target core, and the
        calibrated receive and dispatch (measured on the calibration's machine), times `factor`, plus `extra`."""
        return (spent * self.handler_scale + self.rates.conductor_message_s * self.rates.cpu_slowdown) * factor + extra

    def _conductor(self):
        net, core = self.net, self.conductor
        box = net.inbox[0]
        while True:
            if not box:
                yield net.wait(0)
                continue
            self.queue_max = max(self.queue_max, len(box))
            envelope = box.popleft()
            replies, spent = self._handled(envelope.message, lambda: core.handle(envelope.source, envelope.message))
            self.conductor_messages += 1
            self.conductor_cpu += spent
            by_type = self.conductor_cpu_by.setdefault(type(envelope.message).__name__, [0, 0.0, 0.0])
            by_type[0], by_type[1], by_type[2] = by_type[0] + 1, by_type[1] + spent, max(by_type[2], spent)
            charge = 0.0 if self.free_conductor else self._charge(spent, self._rank0_factor, self._rank0_extra)
            self.post_sends(0, replies, depart=charge)
            if charge:
                self.conductor_busy += charge
                yield self.env.timeout(charge)
            if core.all_committed:        # the job ends once rank 0 has handled the last commit
                self.done.succeed()
                return

    def _subconductor(self, rank: int):
        """A sub-conductor rank (roles/subconductor.py): its core's handler time charged as the conductor's is, and
        a wake-up when its oldest complete unit is due to be sent on."""
        env, net, r = self.env, self.net, self.rates
        core = self.subconductors[rank]
        box = net.inbox[rank]
        self.post_sends(rank, core.start())
        while True:
            if not box:
                mail = net.wait(rank)
                if core.complete:
                    due = core.complete_since + core.commit_seconds - env.now
                    yield env.any_of([mail, env.timeout(max(1e-6, due))])
                else:
                    yield mail
                self.post_sends(rank, core.poll(env.now))
                continue
            envelope = box.popleft()
            replies, spent = self._handled(envelope.message,
                                           lambda: core.handle(envelope.source, envelope.message, env.now))
            charge = self._charge(spent, r.conductor_factor)
            self.subconductor_busy[rank] += charge
            self.post_sends(rank, replies + core.poll(env.now), depart=charge)
            yield env.timeout(charge)

    # --- tokenizer ranks --------------------------------------------------------------------------------
    def _tokenizer(self, rank: int):
        env, net, job, r = self.env, self.net, self.job, self.rates
        core = TokenizerCore(rank, self.roles, job.steal_rows, job.read_ahead_batches)
        if self.start_at.get(rank):
            yield env.timeout(self.start_at[rank])
        self.post_sends(rank, core.start())
        first = True
        while True:
            t0 = env.now
            while core.waiting_for_unit:
                yield net.wait(rank)
                self._take_all(rank, core)
            self.tok_time["waiting_for_unit"] += env.now - t0
            unit, sends = core.next_unit()
            if unit is None:
                if self.first_idle is None:
                    self.first_idle = env.now
                return
            if first:
                first = False
                self.started += 1
                if self.started == len(self.roles.tokenizers):
                    self.all_started = env.now
            self.post_sends(rank, sends)
            progress = UnitProgress()
            # Rows are tokenized chunk_rows at a time and leave in batches of the token budget, the rest of the
            # unit as one smaller batch (batching.BatchAssembler); or, replaying a run from before 0.3, a chunk
            # at a time.
            batch_rows = (max(1, int(job.tokenizer_batch_tokens // r.tokens_per_text)) if job.tokenizer_batch_tokens
                          else job.chunk_rows)
            pending, start = 0, unit.row_start     # a split (tail stealing) moves core.reading.row_stop down
            held: deque = deque()                  # rows of each batch not sent yet (TokenizerCore.holds)
            while start < core.reading.row_stop:
                # The chunks up to the one that fills a batch (or ends the unit), as one stretch of tokenizing:
                # nothing is sent between them, so one timeout is the same virtual time as one per chunk.
                rows = 0
                while start < core.reading.row_stop and pending + rows < batch_rows:
                    take = min(job.chunk_rows, core.reading.row_stop - start)
                    rows, start = rows + take, start + take
                core.position = start
                busy = rows * r.tokens_per_text / r.tokenizer_tokens_per_s
                self.tok_time["tokenizing"] += busy
                yield env.timeout(busy)
                pending += rows
                last = start >= core.reading.row_stop
                while pending >= batch_rows or (last and pending):
                    size = min(pending, batch_rows)
                    pending -= size
                    held.append(size)
                    yield from self._send_rows(rank, core, unit, held, progress)
            yield from self._send_rows(rank, core, unit, held, progress, unit_read=True)
            self.post_sends(rank, core.unit_read(core.reading, progress))

    def _send_rows(self, rank: int, core: TokenizerCore, unit: WorkUnit, held: deque, progress: UnitProgress,
                   unit_read: bool = False):
        """The batches in `held` (their rows), each once a linked encoder rank has credit, returning when the last
        has landed; or none yet while the core holds them (the unit's end sends them all, as EncoderSink does)."""
        env, net, r = self.env, self.net, self.rates
        self._take_all(rank, core)
        if not unit_read and core.holds(len(held) - 1):
            return
        while held:
            rows = held.popleft()
            tokens = int(round(rows * r.tokens_per_text))
            t0 = env.now
            self._take_all(rank, core)
            while (dest := core.route(progress, now=env.now)) is None:
                patience = core.grant_wait(env.now)
                yield net.wait(rank) if patience is None else env.any_of([net.wait(rank), env.timeout(patience)])
                self._take_all(rank, core)
            landed = self._send_batch(rank, dest, SimBatch(unit.unit, rows, tokens, int(tokens * r.bytes_per_token)))
            core.sent(dest, rows, tokens, progress)
            yield landed
            self.tok_time["waiting_for_credit"] += env.now - t0

    def _send_batch(self, rank: int, dest: int, batch: SimBatch) -> simpy.Event:
        """A blocking MPI Send of a batch (transport/mpi.py), by rendezvous far above the eager limit: it completes
        once the encoder rank takes it in. The request goes now; the event returned fires when the data lands."""
        self.net.batches += 1
        self.net.remote_batches += self.host_of[rank] != self.host_of[dest]
        landed = Rendezvous(self.env)
        self.net.post(rank, dest, SendRequest(batch, landed), CONTROL_BYTES)
        return landed

    # --- encoder ranks ----------------------------------------------------------------------------------
    def _encoder(self, rank: int):
        """The encoder rank's loop (roles/encoder.py) around its EncoderCore, and its instances as one server. It
        waits for nothing but mail, so it is not a SimPy process: the network hands it each message as it lands
        (SimNetwork.handlers), which saves the wake-up events of a process (a third of a run's events)."""
        if self.start_at.get(rank):
            yield self.env.timeout(self.start_at[rank])
        loop = _EncoderLoop(self, rank)
        self.net.handlers[rank] = loop.on_mail
        loop.on_mail()

    def _sampler(self):
        """Rows embedded at the times the steady window opens and closes."""
        # Steady state: every tokenizer rank has a unit and every encoder rank has work. A window that opened
        # before the first batches landed would count the pipeline's filling, which a measured run's window (from
        # the encoder ranks being ready, the tokenizers having read while they loaded) does not see.
        while self.all_started is None or self.encoders_working < len(self.roles.encoders):
            yield self.env.timeout(0.05)
        self.window_rows_at["open"] = (self.env.now, self.encoded_rows)
        while self.first_idle is None:
            yield self.env.timeout(0.05)
        self.window_rows_at["close"] = (self.env.now, self.encoded_rows)

    def run(self) -> SimResult:
        wall = time.perf_counter()
        env = self.env
        env.process(self._conductor())
        ranks = ([self._subconductor(s) for s in self.subconductors] + [self._encoder(e) for e in self.roles.encoders]
                 + [self._tokenizer(t) for t in self.roles.tokenizers])
        for process in ranks:
            env.process(process)
        env.process(self._sampler())
        with collector_for_a_large_heap():
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
        tok = {k: v / (n_tok * env.now) for k, v in self.tok_time.items()}     # of their time, from the first start
        tok["idle_after_last_unit"] = max(0.0, 1.0 - sum(tok.values()))
        return SimResult(
            nodes=self.nodes, encoder_ranks=len(self.roles.encoders), tokenizer_ranks=n_tok, rows=rows,
            tokens=int(round(rows * self.rates.tokens_per_text)), units=len(self.conductor.settled_plan().units),
            makespan_s=makespan, throughput_texts_per_s=rows / makespan, steady_texts_per_s=steady,
            tail_s=env.now - (self.first_idle or env.now), conductor_busy=self.conductor_busy / makespan,
            subconductors=len(self.subconductors),
            subconductor_busy_max=max(self.subconductor_busy.values(), default=0.0) / makespan,
            cpu_nodes=cpu_nodes_for(self.nodes, self.shape, self.rates) if self.shape.cpu_node_cores else 0,
            ramp_s=(self.window_rows_at["open"][0] if "open" in self.window_rows_at else env.now) - self.origin,
            conductor_messages=self.conductor_messages,
            conductor_cpu_us_per_message=1e6 * self.conductor_cpu / max(self.conductor_messages, 1),
            conductor_queue_max=self.queue_max, tokenizer_time=tok,
            conductor_us_by_message={k: [n, round(1e6 * s / n, 1), round(1e6 * longest, 1)]
                                     for k, (n, s, longest) in self.conductor_cpu_by.items()},
            gpu_busy=self.gpu_busy / (len(self.roles.encoders) * makespan),
            encoder_rows=[self.encoded_rows_of[e] for e in self.roles.encoders],
            remote_batch_fraction=self.net.remote_batches / max(self.net.batches, 1),
            nic_busy_max=max(self.net.nic_busy) / makespan if self.net.nic_busy else 0.0,
            wall_seconds=time.perf_counter() - wall)


class _EncoderLoop:
    """An encoder rank's loop: take in what has arrived, take batches in while the window has room (the sender's
    Send completes when the data lands), submit encoder batches while the instances have room (credits go back
    as tokens are submitted)."""

    def __init__(self, sim: Simulation, rank: int):
        self.sim, self.rank = sim, rank
        job = sim.job
        self.core = core = EncoderCore(rank, sim.roles, job.credits, job.max_batch_tokens, job.window_batches)
        self.depth = 2 * job.instances
        self.requests: deque = deque()                 # (source, SendRequest) not yet taken in
        self.window: deque = deque()                   # [batch, tokens not yet submitted], landed
        self.state = {"arriving": 0, "in_flight": 0}   # tokens being transferred in; encoder batches submitted
        self.waiting = 0                               # tokens landed and not yet submitted
        self.gpu = EncoderInstances(sim, rank, core, self.state, sim.post_sends)
        sim.post_sends(rank, core.start())

    def on_mail(self) -> None:
        sim, net, rank, core, state = self.sim, self.sim.net, self.rank, self.core, self.state
        box, requests, window = net.inbox[rank], self.requests, self.window
        while box:
            envelope = box.popleft()
            message = envelope.message
            if isinstance(message, SendRequest):
                requests.append((envelope.source, message))
            elif isinstance(message, Landed):
                batch = message.batch
                state["arriving"] -= batch.num_tokens
                window.append([batch, batch.num_tokens])
                self.waiting += batch.num_tokens
                core.batch_taken(envelope.source, batch.num_tokens)
            elif not isinstance(message, StepDone):
                for unit in core.handle(envelope.source, message):
                    sim.post_sends(rank, [core.written(unit, shard_name(unit, rank))])
        while requests and core.has_room(self.waiting, state["arriving"]):
            source, request = requests.popleft()
            state["arriving"] += request.batch.num_tokens
            # The sender's Send returns as the data lands.
            net.land(request.done, source, rank, Landed(request.batch), request.batch.nbytes)
        while window and state["in_flight"] < self.depth:
            step = _cut_step(window, sim.job.max_batch_tokens)
            taken = sum(tokens for _, tokens in step)
            self.waiting -= taken
            state["in_flight"] += 1
            if not self.gpu.submitted:
                sim.encoders_working += 1
            self.gpu.submit(step)
            sim.post_sends(rank, core.submitted(taken, window_empty=not window))


def _cut_step(window: deque, budget: int) -> list:
    """One encoder batch of up to `budget` tokens from the front of the window: (batch, tokens) pieces."""
    step = []
    while window and budget > 0:
        entry = window[0]
        take = min(entry[1], budget)
        step.append((entry[0], take))
        entry[1] -= take
        budget -= take
        if entry[1] == 0:
            window.popleft()
    return step


def simulate(nodes: int, shape: NodeShape, job: JobShape, rates: Rates, **kw) -> SimResult:
    return Simulation(nodes, shape, job, rates, **kw).run()
