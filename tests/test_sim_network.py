"""The simulation's network (scaling/model.py SimNetwork): each NIC direction a queue, and the mailbox of a rank that
reads its mail when it looks."""
from __future__ import annotations

import pytest

from .conftest import REPO

simpy = pytest.importorskip("simpy")

from hpcembed.scaling.calibration import build, rates_from  # noqa: E402
from hpcembed.scaling.model import SimNetwork  # noqa: E402

BENCH = REPO / "bench" / "results"


def test_each_nic_direction_is_its_own_queue():
    """Incast queues at the receiver's ingress, a sender's messages queue at its egress, and a message waiting for
    a busy receiver does not hold its sender's egress from the next message to another host."""
    rates = rates_from(build(BENCH), nic_bytes_per_s=1e6, net_latency_s=0.0)
    second = 1_000_000                          # bytes: one second on a NIC
    net = SimNetwork(simpy.Environment(), rates, host_of=[0, 1, 2, 3])
    assert net._delay(0, 1, second, 0.0) == pytest.approx(1.0)
    assert net._delay(2, 1, second, 0.0) == pytest.approx(2.0)        # host 1's ingress: behind host 0's
    assert net._delay(2, 3, second, 0.0) == pytest.approx(2.0)        # host 2's egress: behind its own first
    # Host 0 again: its egress has been free since 1.0, host 1's ingress is taken until 2.0, host 3's until 2.0.
    assert net._delay(0, 1, second, 0.0) == pytest.approx(3.0)
    assert net._delay(0, 3, second, 0.0) == pytest.approx(3.0)        # its egress queue, and host 3's ingress
    assert net.egress_free[0] == pytest.approx(3.0) and net.ingress_free[3] == pytest.approx(3.0)
    # Within a host nothing is queued.
    local = 0.5 + rates.local_latency_s + second / rates.local_bytes_per_s
    assert net._delay(0, 0, second, 0.5) == pytest.approx(local)


def test_a_rank_that_reads_when_it_looks_sees_its_mail_in_order_of_arrival_and_wakes_for_the_first():
    """Mail to a tokenizer rank is held with no event of its own: it shows when the rank looks and it has arrived,
    in order of arrival (not of posting), and a rank waiting for mail wakes when the first arrives, or earlier when
    something posted meanwhile arrives first."""
    rates = rates_from(build(BENCH), nic_bytes_per_s=1e6, net_latency_s=0.0)
    env = simpy.Environment()
    net = SimNetwork(env, rates, host_of=[0, 1, 1])    # rank 2 beside rank 1, rank 0 on another host
    net.read_when_looking(2)
    hop = 100 / 1e6                                     # a 100-byte message's time on a NIC
    local = rates.local_latency_s + 100 / rates.local_bytes_per_s
    net.post(0, 2, "posted first", 100, depart=3.0)
    net.post(1, 2, "posted second", 100)
    assert env.peek() == float("inf")                   # no event for either
    seen = []

    def look():
        seen.append((env.now, [envelope.message for envelope in net.collect(2)]))
        net.inbox[2].clear()

    def rank_2():
        yield net.wait(2)
        look()
        yield env.timeout(10.0)                         # busy: "posted first" arrives meanwhile, unseen
        look()
        net.post(0, 2, "far", 100, depart=5.0)
        yield net.wait(2)                                # "near", posted at 11 by rank 1, arrives first
        look()
        yield net.wait(2)
        look()

    def rank_1():
        yield env.timeout(11.0)
        net.post(1, 2, "near", 100)

    env.process(rank_2())
    env.process(rank_1())
    env.run()
    assert [messages for _, messages in seen] == [["posted second"], ["posted first"], ["near"], ["far"]]
    assert [t for t, _ in seen] == pytest.approx([local, 10 + local, 11 + local, 15 + local + hop])
