"""The MPI transport's sends between two real ranks: control messages (never blocking since they became isends)
keep their order with each other and with token batches, and nothing is lost when the receiver is busy."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

from .conftest import MPI_ENV, MPIEXEC, REPO, needs_mpi

pytestmark = needs_mpi

SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from hpcembed.tokenize.batch import TokenBatch
    from hpcembed.transport.mpi import MpiTransport
    t = MpiTransport()
    N = 300
    if t.rank == 0:
        start = time.perf_counter()
        for k in range(N):
            t.send(1, ("control", k))
            if k % 10 == 0:
                t.send_batch(1, TokenBatch.build([np.arange(k % 7 + 1)], [f"id{k}"], [k], k))
        sent = time.perf_counter() - start
        t.flush()
        open(sys.argv[1] + ".sender", "w").write(f"sent {N} in {sent:.3f} s")
    else:
        time.sleep(1.0)                 # busy elsewhere while rank 0 sends
        got = []
        while len(got) < N + N // 10:
            envelope = t.recv(5.0)
            assert envelope is not None, f"only {len(got)} messages came"
            m = envelope.message
            got.append(("batch", int(m.units[0])) if isinstance(m, TokenBatch) else m)
        expected = []
        for k in range(N):
            expected.append(("control", k))
            if k % 10 == 0:
                expected.append(("batch", k))
        assert got == expected, (got[:20], expected[:20])
        open(sys.argv[1] + ".receiver", "w").write("order kept")
    t.comm.Barrier()
""")


def test_sends_keep_their_order_while_the_receiver_is_busy(tmp_path):
    script = tmp_path / "order.py"
    script.write_text(SCRIPT)
    report = tmp_path / "report"        # each rank writes its own file: mpiexec may interleave their stdout
    proc = subprocess.run(["timeout", "120", MPIEXEC, "-n", "2", sys.executable, str(script), str(report)],
                          capture_output=True, text=True, cwd=REPO, timeout=150, env={**os.environ, **MPI_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report.receiver").read_text() == "order kept"
    assert (tmp_path / "report.sender").read_text().startswith("sent 300 in ")


def _two_ranks(tmp_path, script: str, how: str) -> str:
    """Run `script` on two ranks with arguments (report file, `how`); the report a rank wrote."""
    path = tmp_path / f"script-{how}.py"
    path.write_text(script)
    proc = subprocess.run(["timeout", "60", MPIEXEC, "-n", "2", sys.executable, str(path), str(tmp_path / how), how],
                          capture_output=True, text=True, cwd=REPO, timeout=90, env={**os.environ, **MPI_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (tmp_path / how).read_text()


WAIT_SCRIPT = textwrap.dedent("""
    import sys, time
    from mpi4py import MPI
    from hpcembed.world import quiet_barrier
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 1:
        time.sleep(1.5)                 # the rank the others wait for, as while it imports torch
    cpu, wall = time.process_time(), time.perf_counter()
    (quiet_barrier if sys.argv[2] == "quiet" else lambda c: c.Barrier())(comm)
    if comm.Get_rank() == 0:
        open(sys.argv[1], "w").write(f"{time.process_time() - cpu:.3f} {time.perf_counter() - wall:.3f}")
""")


def test_a_rank_waiting_at_the_quiet_barrier_leaves_its_core_free(tmp_path):
    """Rank 0 waits 1.5 s for rank 1: at the quiet barrier it uses a small part of that in CPU time, where MPI's
    own barrier spins (the control run shows this check can fail)."""
    used = {}
    for how in ("quiet", "blocking"):
        cpu, wall = map(float, _two_ranks(tmp_path, WAIT_SCRIPT, how).split())
        assert wall > 1.2
        used[how] = cpu / wall
    assert used["quiet"] < 0.2, used
    assert used["blocking"] > 0.5, used


# Two ranks, each with an MPI transport (the scripts below go on from here).
TWO_RANKS = textwrap.dedent("""
    import sys, time
    import numpy as np
    from hpcembed.tokenize.batch import TokenBatch
    from hpcembed.transport.mpi import MpiTransport
    t = MpiTransport()
    def take_until(got, n):
        # recv until `got` holds n messages (a batch as ("batch", its unit)), then write them for the test
        while len(got) < n:
            m = t.recv(5.0).message
            got.append(("batch", int(m.units[0])) if isinstance(m, TokenBatch) else m)
        open(sys.argv[1], "w").write(repr(got))
""")

URGENT_SCRIPT = TWO_RANKS + textwrap.dedent("""
    def batch(k):
        return TokenBatch.build([np.arange(3)], [f"id{k}"], [k], k)
    if t.rank == 0:
        for k in range(40):
            t.send(1, ("bulk", k))
        t.send_batch(1, batch(100))
        t.send(1, ("query", 1), urgent=True)
        t.send_batch(1, batch(200), urgent=True)
        t.send(1, ("query", 2), urgent=True)
        t.send(1, ("bulk", 40))
        t.flush()
    t.comm.Barrier()
    if t.rank == 1:
        time.sleep(0.5)                 # everything has arrived and waits in MPI
        t.urgent_first = sys.argv[2] == "urgent"
        take_until([], 45)
    t.comm.Barrier()
""")


def test_urgent_messages_overtake_the_others_where_the_receiver_asks(tmp_path):
    """A receiver with urgent_first takes urgent messages (a query's) before the others waiting in MPI, each kind
    in the order sent; without it, everything comes in the order sent."""
    got = {how: ast.literal_eval(_two_ranks(tmp_path, URGENT_SCRIPT, how)) for how in ("urgent", "in-order")}
    bulk = [("bulk", k) for k in range(40)] + [("batch", 100)]
    assert got["urgent"] == [("batch", 200), ("query", 1), ("query", 2)] + bulk + [("bulk", 40)]
    assert got["in-order"] == bulk + [("query", 1), ("batch", 200), ("query", 2), ("bulk", 40)]


PROMPT_SCRIPT = TWO_RANKS + textwrap.dedent("""
    if t.rank == 0:
        for k in range(10):
            t.send(1, ("bulk", k))
        t.send_batch(1, TokenBatch.build([np.arange(3)], ["id"], [0], 7))
        t.send(1, ("claim", 1), prompt=True)
        t.send(1, ("bulk", 10))
        t.send(1, ("claim", 2), prompt=True)
        t.flush()
    t.comm.Barrier()
    if t.rank == 1:
        time.sleep(0.5)                 # everything has arrived and waits in MPI
        got = []
        while (envelope := t.recv_prompt()) is not None:
            got.append(envelope.message)
        got.append("then recv")
        take_until(got, 15)
    t.comm.Barrier()
""")


def test_prompt_messages_are_taken_alone_ahead_of_batches_and_bulk(tmp_path):
    """recv_prompt takes only the messages sent prompt (a dedup Claim, which an encoder rank with a full window
    still answers), in their order, and nothing else; recv then brings the rest in the order sent."""
    got = ast.literal_eval(_two_ranks(tmp_path, PROMPT_SCRIPT, "prompt"))
    assert got == [("claim", 1), ("claim", 2), "then recv"] + [("bulk", k) for k in range(10)] + [
        ("batch", 7), ("bulk", 10)]
