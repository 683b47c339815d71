"""The job's topology, in one place: which rank plays which role (RoleMap), which tokenizer ranks send to which
encoder ranks (the link plan), where each rank runs (RankInfo), and the planners that decide all of it from the
ranks an MPI world offers (plan_roles) and from measured rates (plan_tokenizers). Pure: no MPI, no environment.

Roles: rank 0 is the conductor. On hosts with GPUs, the first ranks of each host (rank 0 aside) become encoder
ranks, one per GPU, in host-local order. The rest are tokenizer ranks. Without GPUs (CPU-only clusters) encoder
ranks run on CPU: by default half of the non-conductor ranks, or whatever --tokenizer-ranks leaves. In a Slurm het
step, component 0 (CPU nodes) holds the conductor and the tokenizer ranks and every other component's ranks are
encoder ranks.
"""
from __future__ import annotations

import dataclasses
import math
import socket
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass
class RankInfo:
    rank: int
    host: str
    local_rank: int
    gpus_on_host: int               # GPUs this host offers the job (Slurm's allocation, else what torch sees)
    cuda_devices: int = 0           # CUDA devices torch can use on this host
    het_group: int | None = None
    cores_on_host: int = 0          # cores this host offers the job (Slurm's allocation, else the affinity mask)
    gpu_name: str = ""
    pid: int = 0                    # logged with the role map, for py-spy or kill on a stuck rank


# GPU-stage throughput of one encoder rank (2 instances, fp16, CUDA graphs), measured by bench/gpu_stage.py; see
# bench/results/gpu_stage-NVIDIA_H100_80GB_HBM3.json (before the Triton attention kernel) and gpu_stage-h200.json.
# A GPU not listed is assumed to be as fast as an H100, which errs towards more tokenizer ranks.
# --gpu-tokens-per-s overrides it.
GPU_STAGE_TOKENS_PER_S = {"NVIDIA H100 80GB HBM3": 12.34e6, "NVIDIA H200": 14.22e6}
DEFAULT_GPU_TOKENS_PER_S = 12.34e6
CORES_PER_ENCODER_RANK = 2              # its role loop and the host side of its instances' launches
TOKENIZER_HEADROOM = 1.15           # reading, batching and sending cost beyond the measured tokenizing


@dataclass
class RoleMap:
    conductor: int
    tokenizers: list[int]
    encoders: list[int]
    hosts: dict[int, str] = field(default_factory=dict)
    # The most encoder ranks one tokenizer rank sends to. Links are sparse so that a rank's endpoints stay few at any
    # scale (UCX's RC transport manages ~256 endpoints per process; 8,000 encoder ranks cannot all be peers), and so
    # that credit grants do not grow as encoders x tokenizers.
    fanout: int = 8
    # tokenizer rank -> its sub-conductor (assign_subconductors): the rank it asks for units, reports its units
    # and itself to, and that commits its units. A tokenizer not listed deals with the conductor itself.
    deputies: dict[int, int] = field(default_factory=dict)
    # Sub-conductors send their commits and reports up a tree with this many children a node, merging them on the
    # way, so that rank 0 hears from at most this many however many nodes (commit_parent).
    commit_fanin: int = 32
    # Built on first use; not copied by dataclasses.replace, so a changed map never keeps another's.
    _links: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _under: dict | None = field(default=None, init=False, repr=False, compare=False)
    _roles: dict | None = field(default=None, init=False, repr=False, compare=False)
    _subs: list | None = field(default=None, init=False, repr=False, compare=False)
    _sub_index: dict | None = field(default=None, init=False, repr=False, compare=False)

    def linked_to_all(self) -> "RoleMap":
        """This map with every tokenizer rank linked to every encoder rank (--dedup routes rows by digest)."""
        return dataclasses.replace(self, fanout=max(self.fanout, len(self.encoders)))

    def role_of(self, rank: int) -> str:
        """'idle' is a rank the plan did not need (more tokenizers than the GPUs can take, see world.py)."""
        if self._roles is None:         # built once: rank 0 logs every rank's role, 128,000 of them at 1000 nodes
            self._roles = {**{s: "subconductor" for s in self.subconductors}, **{e: "encoder" for e in self.encoders},
                           **{t: "tokenizer" for t in self.tokenizers}, self.conductor: "conductor"}
        return self._roles.get(rank, "idle")

    @property
    def subconductors(self) -> list[int]:
        self._subconductor_index()
        return list(self._subs)

    def conductor_of(self, tokenizer: int) -> int:
        """Where a tokenizer rank asks for units and reports, and where its units' parts are reported."""
        return self.deputies.get(tokenizer, self.conductor)

    def tokenizers_under(self, subconductor: int) -> list[int]:
        if self._under is None:         # once for all: a simulation asks for each of 1,000 sub-conductors
            self._under = {}
            for t in self.tokenizers:
                if t in self.deputies:
                    self._under.setdefault(self.deputies[t], []).append(t)
        return self._under.get(subconductor, [])

    def reporters(self) -> list[int]:
        """The ranks whose reports the conductor waits for before it stops the encoder ranks: the sub-conductors
        that report to it (commit_children), and the tokenizer ranks that have none."""
        alone = {t for t in self.tokenizers if t not in self.deputies}
        return sorted(set(self.commit_children(self.conductor)) | alone)

    def commit_parent(self, subconductor: int) -> int:
        """Where a sub-conductor sends its commits and its report: the conductor for the first `commit_fanin`
        sub-conductors, and for each later one a sub-conductor above it (a tree of `commit_fanin` children a
        node, as in a heap), which sends them on merged with its own."""
        index = self._subconductor_index()[subconductor]
        return self.conductor if index < self.commit_fanin else self._subs[index // self.commit_fanin - 1]

    def commit_children(self, rank: int) -> list[int]:
        """The sub-conductors whose commits and reports come to `rank` (the conductor or a sub-conductor)."""
        index, fanin = self._subconductor_index(), self.commit_fanin
        if rank == self.conductor:
            return self._subs[:fanin]
        first = fanin * (index[rank] + 1)
        return self._subs[first: first + fanin]

    def _subconductor_index(self) -> dict[int, int]:
        """Sub-conductor -> its place in rank order (built once: the map of 1000 nodes has 111,000 deputies)."""
        if self._sub_index is None:
            self._subs = sorted(set(self.deputies.values()))
            self._sub_index = {s: k for k, s in enumerate(self._subs)}
        return self._sub_index

    def host_of(self, rank: int) -> str:
        return self.hosts.get(rank, socket.gethostname())

    def encoders_of(self, tokenizer: int) -> list[int]:
        """The encoder ranks this tokenizer rank sends its batches to, its own host's first."""
        return self._link_plan()[0].get(tokenizer, [])

    def tokenizers_of(self, encoder: int) -> list[int]:
        """The tokenizer ranks that send to this encoder rank (the ranks it grants credit to)."""
        return self._link_plan()[1].get(encoder, [])

    def _link_plan(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Each tokenizer links to its host's encoder ranks, then to remote ones dealt out in turn, so every
        encoder rank gets about the same number of tokenizers. Where tokenizers x fanout is smaller than the number
        of encoder ranks the fanout grows, so that no encoder rank is left without a tokenizer."""
        if self._links is None:
            gpus, tokenizers = self.encoders, self.tokenizers
            fanout = max(self.fanout, -(-len(gpus) // max(len(tokenizers), 1)))
            by_host: dict[str, list[int]] = {}
            for g in gpus:
                by_host.setdefault(self.host_of(g), []).append(g)
            to_gpus: dict[int, list[int]] = {}
            turn, host_turn = 0, {h: 0 for h in by_host}
            for t in tokenizers:
                host = self.host_of(t)
                local = by_host.get(host, [])
                # Where a host has more encoder ranks than the fanout, its tokenizers take turns over them; where
                # it has fewer, each tokenizer lists them starting one further on. The order breaks routing ties
                # (protocol/tokenizer.py): with one order, every tokenizer of an 8-GPU node sent its first batches
                # to the same encoder rank and stayed with it (simulated: 2 of 8 GPUs working).
                mine = [local[(host_turn.get(host, 0) + k) % len(local)] for k in range(min(fanout, len(local)))]
                if local:
                    host_turn[host] += len(mine) if len(local) > fanout else 1
                remote: list[int] = []
                want = min(fanout, len(gpus))
                while len(mine) + len(remote) < want:
                    g = gpus[turn % len(gpus)]
                    turn += 1
                    if g not in mine:
                        remote.append(g)
                # Tokenizers dealt the same remote encoder ranks (every len(gpus) / want-th one is) list them from
                # different ones, likewise.
                k = (len(to_gpus) // -(-len(gpus) // want)) % len(remote) if remote else 0
                to_gpus[t] = mine + remote[k:] + remote[:k]
            to_tokenizers: dict[int, list[int]] = {}
            for t, gs in to_gpus.items():
                for g in gs:
                    to_tokenizers.setdefault(g, []).append(t)
            self._links = (to_gpus, to_tokenizers)
        return self._links


def plan_roles(ranks: list[RankInfo], tokenizer_ranks: int | None) -> RoleMap:
    size = len(ranks)
    if size < 3:
        raise ConfigError(f"an MPI job needs at least 3 ranks (conductor, tokenizer, encoder); this world has {size}. "
                          "Run without mpiexec for a single-process job")
    others = [r for r in ranks if r.rank != 0]
    if any(r.het_group for r in ranks):
        return _het_roles(ranks)
    if tokenizer_ranks:
        if not 1 <= tokenizer_ranks <= size - 2:
            raise ConfigError(f"--tokenizer-ranks {tokenizer_ranks} does not fit a world of {size} ranks: "
                              f"it needs the conductor, at least one encoder rank, and 1..{size - 2} tokenizers")
        n_gpu = size - 1 - tokenizer_ranks
    elif any(r.gpus_on_host for r in ranks):
        n_gpu = sum(1 for r in others if r.local_rank - (1 if r.host == ranks[0].host else 0) < r.gpus_on_host)
        if n_gpu == 0 or n_gpu == len(others):
            raise ConfigError(f"{size} ranks cannot give every GPU a rank and leave a tokenizer: start more ranks "
                              "per node than GPUs, or pass --tokenizer-ranks")
    else:
        n_gpu = max(1, len(others) // 2)
    # GPU ranks first in host-local order, so each takes its host's next device.
    def gpu_preference(r: RankInfo) -> tuple:
        local = r.local_rank - (1 if r.host == ranks[0].host else 0)
        return (local >= max(r.gpus_on_host, 1), local, r.rank)
    gpus = sorted(sorted(others, key=gpu_preference)[:n_gpu], key=lambda r: r.rank)
    gpu_ids = {r.rank for r in gpus}
    return RoleMap(conductor=0, tokenizers=[r.rank for r in others if r.rank not in gpu_ids],
                   encoders=[r.rank for r in gpus], hosts={r.rank: r.host for r in ranks})


def _het_roles(ranks: list[RankInfo]) -> RoleMap:
    tokenizers = [r.rank for r in ranks if r.rank != 0 and not r.het_group]
    gpus = [r.rank for r in ranks if r.het_group]
    if not tokenizers or ranks[0].het_group:
        raise ConfigError("a het job needs its component 0 (CPU nodes) to hold the conductor and at least one "
                          f"tokenizer rank: component 0 has {len(tokenizers) + 1} task(s)")
    return RoleMap(conductor=0, tokenizers=tokenizers, encoders=gpus, hosts={r.rank: r.host for r in ranks})


def device_for(rank: int, roles: RoleMap, ranks: list[RankInfo]) -> str:
    """The torch device of an encoder rank: its position among its host's encoder ranks, if torch sees CUDA there."""
    info = ranks[rank]
    if not info.cuda_devices:
        return "cpu"
    same_host = [g for g in roles.encoders if ranks[g].host == info.host]
    return f"cuda:{same_host.index(rank) % info.cuda_devices}"


@dataclass
class RatePlan:
    """How many tokenizer ranks the encoder ranks need, from measured rates (the seed's auto-scaling)."""
    encoder_ranks: int
    gpu_tokens_per_s: float         # per encoder rank (its GPU stage)
    gpu_rate_source: str
    tokenizer_tokens_per_s: float   # per tokenizer rank (one core), measured on the conductor
    needed: int                     # tokenizer ranks that keep every encoder rank busy, with headroom
    chosen: int                     # what the world and its cores allow
    available: int
    probed_tokens_per_s: float = 0.0    # what rank 0 measured on one core alone, where tokenizer_tokens_per_s
                                        # is that figure discounted for a node whose every core tokenizes

    @property
    def expected_gpu_busy(self) -> float:
        return min(1.0, self.chosen * self.tokenizer_tokens_per_s / (self.encoder_ranks * self.gpu_tokens_per_s))

    def describe(self) -> str:
        text = (f"plan: {self.encoder_ranks} encoder rank(s) at {self.gpu_tokens_per_s / 1e6:.2f}M tokens/s each "
                f"({self.gpu_rate_source}); a tokenizer rank does {self.tokenizer_tokens_per_s / 1e6:.2f}M "
                + (f"tokens/s on a busy node ({self.probed_tokens_per_s / 1e6:.2f}M measured alone on rank 0)"
                   if self.probed_tokens_per_s else "tokens/s (measured on rank 0)")
                + f", so {self.needed} tokenizer ranks keep them busy; "
                + (f"using {self.chosen} of {self.available} candidates" if self.available else
                   f"no core is spare for them, so {self.chosen} shares one")
                + f", expected gpu busy {self.expected_gpu_busy:.0%}")
        if self.expected_gpu_busy < 0.9:
            text += (f". CPU-bound: give the job {self.needed - self.chosen} more cores for tokenizer ranks, "
                     "or tokenize in a separate job (hpcembed tokenize)")
        return text


def plan_tokenizers(roles: RoleMap, ranks: list[RankInfo], tokenizer_tokens_per_s: float,
                    gpu_tokens_per_s: float = 0.0, probed_tokens_per_s: float = 0.0) -> tuple[RoleMap, RatePlan]:
    """Keep as many of `roles`' tokenizer ranks as the encoder ranks need at measured rates, within each host's
    cores (an encoder rank keeps CORES_PER_ENCODER_RANK, the conductor one); the rest of the ranks stay idle.
    `probed_tokens_per_s`: the one-core measurement `tokenizer_tokens_per_s` was derived from, for the log."""
    gpus = roles.encoders
    names = {ranks[g].gpu_name for g in gpus} - {""}
    if gpu_tokens_per_s:
        source = "--gpu-tokens-per-s"
    elif len(names) == 1 and next(iter(names)) in GPU_STAGE_TOKENS_PER_S:
        gpu_tokens_per_s, source = GPU_STAGE_TOKENS_PER_S[next(iter(names))], f"measured on {next(iter(names))}"
    else:
        gpu_tokens_per_s = DEFAULT_GPU_TOKENS_PER_S
        source = f"assumed H100 figure for {', '.join(sorted(names)) or 'unknown GPU'}"
    needed = math.ceil(len(gpus) * gpu_tokens_per_s * TOKENIZER_HEADROOM / max(tokenizer_tokens_per_s, 1.0))
    # Cores left for tokenizers on each host, then candidates taken round-robin over hosts (rank order within).
    free = {}
    for r in ranks:
        if r.host not in free:
            on_host = [g for g in gpus if ranks[g].host == r.host]
            free[r.host] = max(0, (r.cores_on_host or 1) - CORES_PER_ENCODER_RANK * len(on_host)
                               - (1 if ranks[0].host == r.host else 0))
    by_host: dict[str, list[int]] = {}
    for t in roles.tokenizers:
        by_host.setdefault(ranks[t].host, []).append(t)
    usable = {h: ts[: free[h]] for h, ts in by_host.items()}
    available = sum(len(ts) for ts in usable.values())
    chosen: list[int] = []
    queues = [list(ts) for ts in usable.values()]
    while len(chosen) < min(needed, available):
        for q in queues:
            if q and len(chosen) < needed:
                chosen.append(q.pop(0))
    plan = RatePlan(len(gpus), gpu_tokens_per_s, source, tokenizer_tokens_per_s, needed, len(chosen), available,
                    probed_tokens_per_s)
    if not chosen:          # a host with no spare cores still needs one tokenizer to make progress
        chosen = roles.tokenizers[:1]
        plan.chosen = 1
    return RoleMap(roles.conductor, sorted(chosen), gpus, roles.hosts), plan


# From this many encoder ranks on, `--sub-conductors auto` puts one on each host with tokenizer ranks. One
# conductor handles about 3.4 messages per unit at about 25 us each on an H100-box core (the h100-box study), and
# an encoder rank of that node uses 3.7 units/s of 20,000 rows: 512 encoder ranks keep it about 16% busy. Below
# that a sub-conductor would take a core from tokenizing for nothing.
SUBCONDUCTORS_FROM_ENCODER_RANKS = 512


def assign_subconductors(roles: RoleMap, ranks: list[RankInfo], mode: str = "auto",
                         commit_fanin: int = 32) -> RoleMap:
    """One sub-conductor per host that has tokenizer ranks ('per-node'; 'auto' from
    SUBCONDUCTORS_FROM_ENCODER_RANKS encoder ranks on; 'off'). Each is a rank the rate plan left idle on that host,
    or else the host's last tokenizer rank; it serves that host's tokenizers (protocol/subconductor.py), and
    commits through a tree of `commit_fanin` children a node (RoleMap.commit_parent)."""
    if commit_fanin < 1:
        raise ConfigError(f"--commit-fanin must be at least 1, got {commit_fanin}")
    if mode == "off" or (mode == "auto" and len(roles.encoders) < SUBCONDUCTORS_FROM_ENCODER_RANKS):
        return roles
    if mode not in ("auto", "per-node"):
        raise ConfigError(f"sub-conductors must be auto, per-node or off; got {mode!r}")
    used = {roles.conductor, *roles.tokenizers, *roles.encoders}
    by_host: dict[str, list[int]] = {}
    for t in roles.tokenizers:
        by_host.setdefault(roles.host_of(t), []).append(t)
    idle: dict[str, list[int]] = {}
    for r in ranks:
        if r.rank not in used:
            idle.setdefault(r.host, []).append(r.rank)
    tokenizers, deputies = set(roles.tokenizers), {}
    for host, ts in by_host.items():
        if idle.get(host):
            deputy = idle[host][0]
        elif len(ts) > 1:
            deputy = ts[-1]
            tokenizers.discard(deputy)
            ts = ts[:-1]
        else:
            continue            # a host's only tokenizer rank stays one; it deals with the conductor
        deputies.update({t: deputy for t in ts})
    return dataclasses.replace(roles, tokenizers=sorted(tokenizers), deputies=deputies, commit_fanin=commit_fanin)
