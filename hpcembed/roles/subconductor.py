"""The sub-conductor's real-time driver: receives control messages, hands them to the SubConductorCore with the
time, sends what it returns, and reports once its share of the job is done. Like the conductor it only ever sees
small control messages, and it sleeps while none come (transport.recv), so it costs its host little CPU."""
from __future__ import annotations

import time

from ..manifest import SubConductorStats
from ..protocol.subconductor import SubConductorCore
from ..transport.base import Transport
from .common import deliver


def run_subconductor(core: SubConductorCore, transport: Transport) -> None:
    clock = time.monotonic
    started = time.process_time()
    messages, handling, handling_cpu = 0, 0.0, 0.0
    deliver(transport, core.start())
    while not core.released:
        # Wake at least a few times per commit interval, so a complete unit is never held much longer than that.
        envelope = transport.recv(timeout=core.commit_seconds / 4)
        now = clock()
        if envelope is not None:
            cpu = time.thread_time()
            deliver(transport, core.handle(envelope.source, envelope.message, now))
            messages, handling = messages + 1, handling + clock() - now
            handling_cpu += time.thread_time() - cpu
        deliver(transport, core.poll(now))
        if core.ready_to_report:
            stats = SubConductorStats(transport.rank, "subconductor", core.roles.host_of(transport.rank),
                                      busy_seconds=time.process_time() - started,
                                      messages_handled=messages, handling_seconds=handling,
                                      handling_cpu_seconds=handling_cpu,
                                      units_committed=core.units_committed, commit_batches=core.batches_sent)
            deliver(transport, core.report(stats))
