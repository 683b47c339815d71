"""How fast this machine runs a control rank's kind of Python, so that the simulation's charges do not depend on
the machine that runs it.

The simulation times each control message's handler (the conductor's, a sub-conductor's) on the machine running
it, and charges a target node's core for it in virtual time. The time measured here has to be scaled to that
core: before this probe it was scaled by the calibration's cpu_slowdown, which holds only on the machine the
calibration was made on (a slower CI box charged rank 0 3.6x more: bench/notes/scale_out.md). Now the same fixed
workload is timed here and on the target machine (bench/control_probe.py, committed), and a handler's time is
scaled by their ratio.

The workload is the kind of work the handlers do, but fixed: it never changes with the protocol's code, so probes
taken in different sessions stay comparable. Change PROBE_VERSION if it is ever changed.
"""
from __future__ import annotations

import functools
import gc
import json
import pickle
import time
from dataclasses import dataclass, field

PROBE_VERSION = 1
_MESSAGES = 2000


@dataclass
class _Message:
    unit: int
    shard: str
    rows: int
    tokens: int
    sent: dict = field(default_factory=dict)


def _workload() -> int:
    """Pickle and unpickle small dataclass messages, keep them in a dict, format ledger-like lines, drop them."""
    table: dict[int, _Message] = {}
    lines = []
    for k in range(_MESSAGES):
        message = pickle.loads(pickle.dumps(_Message(k, f"part-{k:08d}-r{k % 61:05d}.parquet", 20_000, 2_944_000,
                                                     {k % 7: 20_000, k % 5 + 8: 1_000}), pickle.HIGHEST_PROTOCOL))
        table[message.unit] = message
        lines.append(json.dumps({"kind": "unit", "unit": message.unit, "shards": {message.shard: message.rows},
                                 "tokens": message.tokens}) + "\n")
    size = len("".join(lines))
    for k in range(_MESSAGES):
        del table[k]
    return size


def probe_seconds(repeats: int = 7) -> float:
    """The workload's fastest time of `repeats` here, in seconds (the fastest: what the core can do, not what a
    busy moment on a shared machine let it)."""
    best = float("inf")
    gc.disable()
    try:
        _workload()                     # warm: the first run pays for imports and the allocator's growth
        for _ in range(repeats):
            start = time.perf_counter()
            _workload()
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def handler_scale(target_probe_s: float, cpu_slowdown: float, here_probe_s: float | None = None) -> float:
    """What a handler's time measured here is multiplied by to give the target core's: the probe's ratio when the
    target's probe is known, else the calibration's cpu_slowdown (right only on the machine it was made on)."""
    if not target_probe_s:
        return cpu_slowdown
    return target_probe_s / (here_probe_s if here_probe_s is not None else here_probe_seconds())


@functools.lru_cache(maxsize=1)
def here_probe_seconds() -> float:
    """probe_seconds() once per process: every simulation of one study is scaled alike."""
    return probe_seconds()


def pickle_seconds(message, repeats: int = 2000) -> tuple[float, float]:
    """Seconds to unpickle and to pickle `message`, here."""
    data = pickle.dumps(message)
    start = time.perf_counter()
    for _ in range(repeats):
        pickle.loads(data)
    middle = time.perf_counter()
    for _ in range(repeats):
        pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return (middle - start) / repeats, (time.perf_counter() - middle) / repeats


class HandlerClock:
    """Times a control rank's handler as the simulation charges it: unpickling its message beyond what a small
    message's takes (the calibrated conductor_message_s holds that), the handler itself, and pickling its replies
    beyond a small reply's each (a grant of a block of units is a large pickle; the real conductor's time per
    message was 1.4-2.7x what was charged without it: bench/notes/scale_out.md, fan-in).

    The time is the thread's CPU time, as the fan-in rehearsals measured the real conductor's: a core this machine
    gives to another process meanwhile is not the target's cost. (It does not steady every run: two projections
    measured rank 0's commit handler at 7-9x what other runs did, by either clock; bench/notes/scale_out.md,
    session 23.)"""

    def __init__(self, small_message):
        self.small_unpickle, self.small_pickle = pickle_seconds(small_message)

    def run(self, data: bytes, handle) -> tuple[list, float]:
        """`handle(message)` on `data` unpickled: its replies ([(dest, message)]) and the seconds charged."""
        clock = time.thread_time
        # Python's cyclic collector, run inside the timed section, would charge one rank's handler with a pause
        # caused by the whole simulation's objects (hundreds of ms with 100,000 ranks): it waits until after.
        gc.disable()
        try:
            t0 = clock()
            message = pickle.loads(data)
            t1 = clock()
            replies = handle(message)
            t2 = clock()
            for _, reply in replies:
                pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)
            t3 = clock()
        finally:
            gc.enable()
        return replies, (t2 - t1 + max(0.0, t1 - t0 - self.small_unpickle)
                         + max(0.0, t3 - t2 - len(replies) * self.small_pickle))
