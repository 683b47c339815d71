"""The conductor's real-time driver: receives control messages, hands them to the ConductorCore, sends what it
returns, and checks for a stop signal between messages. It only ever sees small control messages."""
from __future__ import annotations

import time

from ..manifest import JobResult
from ..protocol.conductor import ConductorCore
from ..signals import STOP, StopRequest
from ..transport.base import Transport
from .common import deliver

_QUIET_POLL = 0.5       # seconds between looks at the stop signal and the progress line when no message comes


def run_conductor(core: ConductorCore, transport: Transport, progress, stop: StopRequest = STOP) -> JobResult:
    start = time.monotonic()
    messages, handling, handling_cpu = 0, 0.0, 0.0
    try:
        while not core.finished:
            envelope = transport.recv(timeout=_QUIET_POLL)
            progress.tick()
            core.output.lock.refresh()
            core.ledger.tick()
            if envelope is not None:
                t0, cpu = time.perf_counter(), time.thread_time()
                deliver(transport, core.handle(envelope.source, envelope.message))
                messages, handling = messages + 1, handling + time.perf_counter() - t0
                handling_cpu += time.thread_time() - cpu
            deliver(transport, core.poll(stop.signal_name if stop.requested else ""))
    finally:
        core.ledger.close()
        core.output.flush()
        progress.close()
    result = core.result(time.monotonic() - start, time.time())
    result.messages_handled, result.handling_seconds, result.handling_cpu_seconds = messages, handling, handling_cpu
    return result
