"""The owner's host cost per row under --dedup: claims, embeddings kept, references filled (roles/dedup.py
DigestTable), against a plain Python dict doing the same lookups in the same run. One thread; these run on an
encoder rank's loop thread, which sets a node's pace.

    python -m bench.dedup_host [--rows 1000000] [--repeats 0.3]

Rows arrive as the job sends them: claims of 1,024 digests, encoded batches of 1,450 rows (262k tokens at the
standard corpus' mean), and each repeat referenced once at the end of its unit. A referenced row's embedding is
copied from the table by a shard writer thread (KeptRows), timed apart as "placed"; the dict baseline stacks its
rows in its references step, on the loop thread. Each batch's embeddings are
allocated as the engine hands them over, inside the timed loop: in pinned memory from torch's caching host
allocator where CUDA is there (engine/varlen.py), else a fresh array; so a table that keeps them pays for the
allocator's pool not being reused, and one that copies them pays for the copy. JSON: bench/results/
dedup_host-<device>.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import device_name, record, table
from hpcembed.roles.dedup import DigestTable


def _handed_over(batch: np.ndarray, pinned: bool) -> np.ndarray:
    """A batch's embeddings in a buffer of their own, as the encoder's instance hands them to the loop."""
    if pinned:
        import torch
        host = torch.empty(batch.shape, dtype=torch.float32, pin_memory=True)
        host.numpy()[:] = batch
        return host.numpy()
    return batch.copy()


def _dict_table(claims, batches, refs, embeddings, pinned: bool) -> dict[str, float]:
    """The same three steps on a dict of bytes -> slot (the baseline)."""
    slots: dict[bytes, int] = {}
    store, spent = [], {}
    start = time.perf_counter()
    for digests in claims:
        raw = digests.tobytes()
        for k in range(len(digests)):
            d = raw[16 * k: 16 * k + 16]
            if d not in slots:
                slots[d] = -1
    spent["claim"] = time.perf_counter() - start
    start = time.perf_counter()
    for digests, batch in batches:
        raw, batch = digests.tobytes(), _handed_over(batch, pinned)
        for k in range(len(digests)):
            d = raw[16 * k: 16 * k + 16]
            if slots.get(d) == -1:
                slots[d] = len(store)
                store.append(batch[k])          # a view: the floor, where the table copies each row once
    spent["encoded"] = time.perf_counter() - start
    start = time.perf_counter()
    for digests in refs:
        raw = digests.tobytes()
        picks = [slots[raw[16 * k: 16 * k + 16]] for k in range(len(digests))]
        np.stack([store[p] for p in picks])
    spent["references"] = time.perf_counter() - start
    return spent


def _digest_table(claims, batches, refs, embeddings, pinned: bool) -> dict[str, float]:
    owner = DigestTable(memory_bytes=1 << 34)
    spent = {}
    start = time.perf_counter()
    for digests in claims:
        owner.claim(digests.tobytes())
    spent["claim"] = time.perf_counter() - start
    start = time.perf_counter()
    for digests, batch in batches:
        owner.encoded(digests, _handed_over(batch, pinned))
    spent["encoded"] = time.perf_counter() - start
    start = time.perf_counter()
    filled = [owner.references(0, [""] * len(digests), list(range(len(digests))), digests.tobytes())
              for digests in refs]
    spent["references"] = time.perf_counter() - start
    # The copy of each referenced row's embedding, which a shard writer thread makes (KeptRows), not the loop.
    start = time.perf_counter()
    for f in filled:
        owner.place(f.slots, np.empty((len(f.slots), owner.width), owner.dtype), np.arange(len(f.slots)))
    spent["placed"] = time.perf_counter() - start
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=float, default=0.3)
    ap.add_argument("--dim", type=int, default=384)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 256, size=(int(args.rows * (1 - args.repeats)), 16), dtype=np.uint8)
    rows = np.concatenate([np.arange(len(distinct)), rng.integers(0, len(distinct), args.rows - len(distinct))])
    rng.shuffle(rows)
    digests = distinct[rows]
    seen, first = set(), np.zeros(len(rows), dtype=bool)
    for k, r in enumerate(rows.tolist()):
        if r not in seen:
            seen.add(r)
            first[k] = True
    claims = [digests[k: k + 1024] for k in range(0, len(rows), 1024)]
    firsts = np.flatnonzero(first)
    embeddings = rng.random((len(distinct), args.dim), dtype=np.float32)
    # Each encoded batch's embeddings, as the encoder hands them over (made before the clock starts).
    batches = [(distinct[rows[firsts[k: k + 1450]]], embeddings[rows[firsts[k: k + 1450]]])
               for k in range(0, len(firsts), 1450)]
    repeats = digests[~first]
    refs = [repeats[k: k + 1400] for k in range(0, len(repeats), 1400)]
    pinned = _cuda()
    results = {}
    for name, run in (("dict (baseline)", _dict_table), ("DigestTable", _digest_table)):
        spent = run(claims, batches, refs, embeddings, pinned)
        loop = {k: v for k, v in spent.items() if k != "placed"}
        results[name] = {"claim_us_per_row": round(1e6 * spent["claim"] / len(rows), 3),
                         "encoded_us_per_first": round(1e6 * spent["encoded"] / len(firsts), 3),
                         "references_us_per_repeat": round(1e6 * spent["references"] / max(1, len(repeats)), 3),
                         "placed_us_per_repeat": round(1e6 * spent.get("placed", 0.0) / max(1, len(repeats)), 3),
                         "us_per_row": round(1e6 * sum(spent.values()) / len(rows), 3),
                         "loop_us_per_row": round(1e6 * sum(loop.values()) / len(rows), 3)}
    print(table([(n, r["claim_us_per_row"], r["encoded_us_per_first"], r["references_us_per_repeat"],
                  r["placed_us_per_repeat"], r["us_per_row"], r["loop_us_per_row"]) for n, r in results.items()],
                ("table", "claim µs/row", "encoded µs/first", "references µs/repeat", "placed by writer µs/repeat",
                 "all µs/row", "loop thread µs/row")))
    print("wrote", record("dedup_host", device_name().split(" (")[0].replace(" ", "_"),
                          {"rows": args.rows, "repeats": args.repeats, "dim": args.dim, "batches_pinned": pinned,
                           "results": results}))


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
