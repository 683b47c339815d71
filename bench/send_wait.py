"""Does a small blocking send wait for its receiver? Two ranks: rank 0 sends 200 small pickled control messages
(about 300 bytes, an AssignUnit's size) 1 ms apart, first with a blocking `comm.send`, then with `comm.isend`;
rank 1 looks for them only every 5 ms, as a rank busy in its tokenizer would. Prints the time each call took.

    mpiexec -n 2 python -m bench.send_wait

On an MPI whose small sends complete eagerly both are microseconds; where the blocking one lasts until the
receiver polls, a rank that serves many busy peers (the conductor) stalls on each (bench/notes/scale_out.md).
JSON: bench/results/send_wait-<device>.json, `benchmark: "send_wait"`.
"""
from __future__ import annotations

import time

MESSAGES = 200
RECEIVER_POLL_S = 0.005
MESSAGE = {"unit": 5, "path": "/data/corpus/part-00001.parquet" * 8}


def _sender(comm, mode: str) -> dict:
    seconds, requests = [], []
    for _ in range(MESSAGES):
        start = time.perf_counter()
        if mode == "send":
            comm.send(MESSAGE, dest=1, tag=11)
        else:
            requests.append(comm.isend(MESSAGE, dest=1, tag=11))
        seconds.append(time.perf_counter() - start)
        time.sleep(0.001)
    for request in requests:
        request.wait()
    seconds.sort()
    return {"median_us": round(1e6 * seconds[MESSAGES // 2], 1), "p90_us": round(1e6 * seconds[MESSAGES * 9 // 10], 1),
            "max_us": round(1e6 * seconds[-1], 1)}


def _receiver(comm, MPI) -> None:
    got, status = 0, MPI.Status()
    while got < MESSAGES:
        time.sleep(RECEIVER_POLL_S)
        while comm.Iprobe(source=0, tag=11, status=status):
            comm.recv(source=0, tag=11)
            got += 1


def main() -> None:
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    result = {}
    for mode in ("send", "isend"):
        comm.Barrier()
        if comm.Get_rank() == 0:
            result[mode] = _sender(comm, mode)
        elif comm.Get_rank() == 1:
            _receiver(comm, MPI)
        comm.Barrier()
    if comm.Get_rank() == 0:
        from bench.common import device_name, record, table
        print(table([(m, r["median_us"], r["p90_us"], r["max_us"]) for m, r in result.items()],
                    ("call", "median µs", "p90 µs", "max µs")))
        result.update(mpi=MPI.Get_library_version().splitlines()[0].strip(), messages=MESSAGES,
                      receiver_poll_s=RECEIVER_POLL_S, message_bytes=len(__import__("pickle").dumps(MESSAGE)))
        print("wrote", record("send_wait", device_name().replace(" ", "_"), result))


if __name__ == "__main__":
    main()
