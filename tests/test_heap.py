"""hpcembed/heap.py: the start-up heap frozen out of the collector, and collections timed by its callbacks. Each
case runs in a fresh interpreter: freezing the test process's own heap would change every later test's."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import gc, json
from hpcembed.heap import GcPauses, settle
startup = [[k] for k in range(50_000)]           # objects that live as long as the process
frozen = settle()
pauses = GcPauses().start()
cycle = []; cycle.append(cycle)                   # garbage only a collection frees
gc.collect()
pauses.stop()
gc.collect()                                      # after stop(): not counted
print(json.dumps({"frozen": frozen, "summary": pauses.summary(), "said": pauses.said()}))
"""


@pytest.mark.parametrize("freeze", ["1", "0"])
def test_settle_freezes_the_startup_heap_and_pauses_are_counted(freeze):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True,
                         env={"HPCEMBED_GC_FREEZE": freeze, "PATH": ""})
    got = json.loads(out.stdout)
    if freeze == "1":
        assert got["frozen"] >= 50_000
    else:
        assert got["frozen"] == 0
    assert got["summary"]["gen2"]["collections"] == 1 and got["summary"]["gen2"]["longest_ms"] > 0
    assert got["said"].startswith("1 full garbage collection, longest ")
