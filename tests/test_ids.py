"""Duplicate ids: within one reader, and across readers through the hash-partitioned exchange."""
from __future__ import annotations

import numpy as np

from hpcembed.io.ids import IdRegistry, find_cross_duplicates


class _Delivered:
    """Stands in for the collective on one owner: returns what every rank sent that owner."""

    def __init__(self, received: list[np.ndarray]):
        self.size, self.received = len(received), received

    def __call__(self, parts):
        return self.received


def exchange(registries: list[IdRegistry]):
    size = len(registries)
    outgoing = [r.partitions(size) for r in registries]
    return [dup for owner in range(size)
            for dup in find_cross_duplicates(registries[owner],
                                             _Delivered([outgoing[src][owner] for src in range(size)]))]


def test_within_one_registry_names_the_first_row():
    reg = IdRegistry()
    assert reg.add("a.jsonl", [0, 1], ["x", "y"], file_index=0) == []
    dups = reg.add("b.jsonl", [5, 6], ["y", "z"], file_index=1)
    assert [(pos, e.path, e.row, e.row_id) for pos, e in dups] == [(0, "b.jsonl", 5, "y")]
    assert "first seen in a.jsonl at row 1" in dups[0][1].reason


def test_across_registries_keeps_the_smallest_file_and_row():
    regs = [IdRegistry() for _ in range(3)]
    regs[0].add("f2", [0, 1], ["shared", "only0"], file_index=2, unit=20)
    regs[1].add("f0", [7], ["shared"], file_index=0, unit=0)
    regs[2].add("f1", [3, 4], ["other", "shared"], file_index=1, unit=10)
    regs[2].add("f3", [0], ["other2"], file_index=3, unit=30)
    dups = exchange(regs)
    found = sorted((int(d["file"]), int(d["row"]), int(d["unit"]), int(f["file"]), int(f["row"])) for d, f in dups)
    assert found == [(1, 4, 10, 0, 7), (2, 0, 20, 0, 7)]


def test_no_duplicates_and_empty_registries():
    regs = [IdRegistry() for _ in range(4)]
    for k, reg in enumerate(regs[:3]):
        reg.add(f"f{k}", list(range(100)), [f"{k}-{i}" for i in range(100)], file_index=k)
    assert exchange(regs) == []
    parts = regs[0].partitions(4)
    assert sum(len(p) for p in parts) == 100 and all(len(p) for p in parts)   # spread over every owner
