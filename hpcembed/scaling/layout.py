"""The simulated cluster: the role map the real planners make for a node shape (8-GPU nodes, or CPU-only tokenizer
nodes beside GPU nodes), and the work units of a simulated job."""
from __future__ import annotations

import math
from itertools import accumulate

from ..io.sources import InputFile, Plan, WorkUnit
from ..topology import TOKENIZER_HEADROOM, RankInfo, RoleMap, assign_subconductors, plan_roles, plan_tokenizers
from .model import JobShape, NodeShape, Rates


def cpu_nodes_for(gpu_nodes: int, shape: NodeShape, rates: Rates) -> int:
    """The disaggregated shape's CPU-only nodes: enough tokenizer ranks for the GPU nodes at the measured rates
    (the rate plan's own rule, topology.plan_tokenizers), a core each kept for the conductor and the node's
    sub-conductor."""
    needed = math.ceil(gpu_nodes * shape.gpus * rates.gpu_tokens_per_s * TOKENIZER_HEADROOM
                       / rates.tokenizer_tokens_per_s)
    return max(1, math.ceil((needed + 1) / (shape.cpu_node_cores - 1)))


def build_world(nodes: int, shape: NodeShape, rates: Rates) -> tuple[RoleMap, list[int]]:
    """The role map the real planning code makes for `nodes` nodes of `shape`, and each rank's node."""
    ranks, host_of = [], []

    def add_node(cores: int, gpus: int, group: int | None) -> None:
        host = len(set(host_of))
        for local in range(cores):
            ranks.append(RankInfo(len(ranks), f"node{host}", local, gpus, gpus, group, cores, shape.gpu_name))
            host_of.append(host)

    if shape.cpu_node_cores:            # a het job: CPU nodes (component 0) first, then GPU nodes of encoders only
        for _ in range(cpu_nodes_for(nodes, shape, rates)):
            add_node(shape.cpu_node_cores, 0, 0)
        for _ in range(nodes):
            add_node(shape.gpus, shape.gpus, 1)
    else:
        for _ in range(nodes):
            add_node(shape.cores, shape.gpus, None)
    roles = plan_roles(ranks, None)
    if shape.tokenizers:
        keep = []
        for n in range(max(host_of) + 1):
            keep += [t for t in roles.tokenizers if host_of[t] == n][: shape.tokenizers]
        roles = RoleMap(roles.conductor, sorted(keep), roles.encoders, roles.hosts)
    else:
        roles, _ = plan_tokenizers(roles, ranks, rates.tokenizer_tokens_per_s, rates.gpu_tokens_per_s)
    return assign_subconductors(roles, ranks, shape.subconductors), host_of


def unit_plan(job: JobShape, rows: int) -> Plan:
    file = InputFile(0, "simulated-corpus.jsonl", "jsonl")
    if job.unit_sizes:
        sizes = [size for size, count in job.unit_sizes for _ in range(count)]
        if sum(sizes) != rows:
            raise ValueError(f"the unit sizes add up to {sum(sizes)} rows, the job has {rows}")
    else:
        sizes = [min(job.unit_rows, rows - start) for start in range(0, rows, job.unit_rows)]
    starts = [0, *accumulate(sizes[:-1])]
    units = [WorkUnit(u, file, start, start + size) for u, (start, size) in enumerate(zip(starts, sizes))]
    return Plan([file], {0: rows}, units, [])


def units_for(nodes: int, shape: NodeShape, rates: Rates, units_per_tokenizer: float, unit_rows: int) -> int:
    """Rows per node for a weak-scaling run in which each tokenizer rank reads about `units_per_tokenizer`."""
    roles, _ = build_world(1, shape, rates)
    return int(math.ceil(len(roles.tokenizers) * units_per_tokenizer)) * unit_rows
