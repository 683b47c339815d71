"""The MPI launcher: every rank of an mpiexec or srun world runs `run_mpi`. Bring-up (transport, Slurm checks,
who is where), then rank 0 prepares the job and broadcasts a typed RunPlan, every rank connects the data path it
names, runs its role, and all meet at a final barrier.

Any failure on any rank ends the whole world (MPI_Abort) after the conductor prints it: allocation hours are not
left to hang.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from ..config import JobConfig
from ..engine.model import ModelSpec
from ..errors import HpcEmbedError
from ..heap import settle
from ..io.writer import OutputDir
from ..manifest import ControlStats
from ..progress import Progress
from ..protocol.conductor import ConductorCore
from ..protocol.subconductor import SubConductorCore
from ..roles.common import run_role
from ..roles.conductor import run_conductor
from ..roles.subconductor import run_subconductor
from ..signals import STOP
from ..slurm import SlurmTask
from ..topology import RankInfo, device_for, plan_roles
from ..transport.base import Transport
from ..world import closing_barrier
from .build import build_encoders, calibrate_for, check_fp8, encoder_rank, tokenizer_rank
from .calibrate import agree
from .kinds import JobKind
from .planning import EarlyRateProbe, choose_data_path, job_device, open_transport, plan_job_roles
from .setup import JobSetup, RunPlan, already_complete, finish, model_spec, prepare

log = logging.getLogger("hpcembed")


class _Reported(HpcEmbedError):
    """A user error rank 0 found while planning, raised again there after every rank has heard of it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_mpi(cfg: JobConfig, kind: JobKind) -> dict | None:
    """Run this rank's role. Returns the manifest on the conductor, None elsewhere."""
    from ..world import gather_ranks, process_started_at
    transport = open_transport(kind.transport_choice(cfg))
    mpi_ready = time.time()
    comm, rank = transport.comm, transport.rank
    slurm = SlurmTask.from_environ()
    if slurm is not None:
        slurm.check_world(transport.size)
    probe = EarlyRateProbe(cfg, kind) if rank == 0 else None
    ranks = gather_ranks(comm)
    STOP.install(announce=rank == 0)
    # Python, imports and MPI initialised (mpi_ready); every rank's host and GPUs known, where one rank a machine
    # has imported torch and initialised CUDA (ranks_gathered).
    startup = {"process_started": process_started_at() or mpi_ready, "mpi_ready": mpi_ready,
               "ranks_gathered": time.time()}
    early = _build_early(cfg, kind, ranks, rank) if rank != 0 else None
    setup, plan = _plan(cfg, kind, transport, ranks, probe, startup) if rank == 0 else (None, None)
    try:
        manifest, complete = _run_plan(cfg, kind, transport, ranks, setup, plan, early, startup)
    finally:
        if setup is not None:
            setup.output.lock.release()
    if complete and rank != 0:
        _leave_without_teardown()
    return manifest


def _run_plan(cfg: JobConfig, kind: JobKind, transport, ranks: list[RankInfo], setup: JobSetup | None,
              plan: RunPlan | None, early, startup: dict[str, float]) -> tuple[dict | None, bool]:
    """This rank's part of the plan: the manifest (the conductor's), and whether the job ran and is complete,
    which every rank learns from the conductor as the world closes."""
    comm, rank = transport.comm, transport.rank
    plan, plan_sends = _share_plan(comm, plan)
    startup["plan_sent" if rank == 0 else "plan_received"] = time.time()
    if plan.status == "error":
        if rank == 0:
            _settle(plan_sends)
            raise _Reported(plan.error, plan.exit_code)
        return None, False
    if plan.status == "complete":
        _settle(plan_sends)
        return (already_complete(setup) if rank == 0 else None), False
    transport = _connect(transport, plan)
    role = plan.roles.role_of(rank)
    # The tokenizer ranks' own communicator, for the cross-rank duplicate-id exchange. Made by the tokenizer ranks
    # alone (MPI_Comm_create_group), so that they start reading while an encoder rank is still building.
    # The encoder ranks' own, likewise, to agree on int8 calibration ranges.
    role_comm = (comm.Create_group(comm.group.Incl(plan.roles.tokenizers)) if role == "tokenizer" else
                 comm.Create_group(comm.group.Incl(plan.roles.encoders)) if role == "encoder" and plan.calibration
                 else None)
    manifest = None
    if role == "conductor":
        manifest = _run_conductor(cfg, transport, plan, ranks, setup, startup)
    elif role == "subconductor":
        core = SubConductorCore(rank, plan.roles, steal_rows=cfg.steal_rows)
        run_role(role, transport, plan.roles.conductor, lambda: run_subconductor(core, transport))
    elif role != "idle":
        _run_worker(cfg, kind, transport, plan, ranks, role, role_comm, early, startup)
    STOP.ignore_from_now()              # this rank's part is done; ranks still working may yet exit 75
    _settle(plan_sends)
    transport.flush()
    # Nobody leaves early: an encoder rank may still be returning credits to a finished tokenizer, and sending to
    # a rank that has finalized MPI is fatal. On failure the conductor aborts the world instead.
    complete = closing_barrier(comm, bool(manifest and manifest["complete"]))
    transport.close()
    return manifest, complete


_PLAN_TAG = 10          # apart from the transport's tags (transport/mpi.py)


def _share_plan(comm, plan: RunPlan | None) -> tuple[RunPlan, list]:
    """Rank 0 sends the plan to every rank without waiting for any of them, and goes on to conduct; the others
    receive it. Not a broadcast: in a broadcast's tree rank 0 (and the ranks below an encoder rank) waited until an
    encoder rank building its encoders early joined, so no tokenizer had a unit before the encoders were built.
    Returns the plan and rank 0's pending sends, completed before the world ends (_settle)."""
    if comm.Get_rank() == 0:
        return plan, [comm.isend(plan, dest=r, tag=_PLAN_TAG) for r in range(1, comm.Get_size())]
    while not comm.Iprobe(source=0, tag=_PLAN_TAG):        # a blocking receive would spin while rank 0 plans
        time.sleep(0.005)
    return comm.recv(source=0, tag=_PLAN_TAG), []


def _leave_without_teardown() -> None:
    """A rank that holds torch leaves with os._exit once the job is complete and MPI is finalized. Python's
    teardown of torch and its CUDA context took 0.61-0.64 s on the H100 box against 0.13-0.24 s with os._exit, and
    mpiexec waits for the last rank to exit: that teardown was most of the 0.4-0.6 s from the job's last commit to
    mpiexec's exit. Nothing is left to flush: the rank's shards are written and committed, its files closed.
    Only once the conductor has said the job is complete (closing_barrier), and only under Open MPI, where it was
    measured (eight jobs on the H100 box, all exit 0). Under MPICH's Hydra it is not safe: a rank leaving this way
    made mpiexec exit 0 in 2 of 10 jobs whose rank 0 then aborted with exit 2, and once exit 9 (a rank killed) in a
    complete five-rank job of the CPU box's suite. HPCEMBED_FAST_EXIT=0 keeps the ordinary exit."""
    if "torch" not in sys.modules or os.environ.get("HPCEMBED_FAST_EXIT") == "0":
        return
    from mpi4py import MPI
    if not MPI.Get_library_version().startswith("Open MPI"):
        return
    if not MPI.Is_finalized():
        MPI.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _settle(sends: list) -> None:
    """Complete rank 0's plan sends, sleeping between looks like world.quiet_barrier."""
    while sends and not all(request.Test() for request in sends):
        time.sleep(0.005)
    sends.clear()


def _plan(cfg: JobConfig, kind: JobKind, transport, ranks: list[RankInfo], probe: EarlyRateProbe | None,
          startup: dict[str, float]) -> tuple[JobSetup | None, RunPlan]:
    """The conductor's part of start-up, marked in `startup`: the job prepared (model, inputs, output), then the
    roles planned (the tokenizer probe's rate waited for)."""
    setup = None
    try:
        setup = prepare(cfg, kind, job_device(cfg, ranks) if kind.has_encoders else "cpu")
        startup["prepared"] = time.time()
        if setup.status == "complete":
            return setup, RunPlan("complete")
        roles = plan_job_roles(cfg, kind, setup, ranks, probe)
        startup["roles_planned"] = time.time()
        dedup, why_not = setup.dedup(cfg, roles)
        if dedup:           # every row may belong to any encoder rank
            roles = roles.linked_to_all()
        batch_tokens = cfg.batch_tokens_for(job_device(cfg, ranks)) if kind.has_encoders else 0
        return setup, RunPlan("run", roles, setup.spec, setup.committed_shards(),
                              choose_data_path(kind.transport_choice(cfg), transport, roles), batch_tokens,
                              *setup.calibration(cfg), digest_seed=setup.digest_seed, dedup=dedup,
                              reuse=setup.reuse_shards, fp8_sample=setup.fp8_sample(cfg))
    except HpcEmbedError as exc:
        if setup is not None:
            setup.output.lock.release()
        return None, RunPlan("error", error=str(exc), exit_code=exc.exit_code)


def _connect(transport: Transport, plan: RunPlan) -> Transport:
    """Open the data path the plan names. Collective: ranks off the data path take part with no peers."""
    roles, rank = plan.roles, transport.rank
    if plan.data_path == "ucx":
        role = roles.role_of(rank)
        peers = (roles.encoders_of(rank) if role == "tokenizer" else
                 roles.tokenizers_of(rank) if role == "encoder" else [])
        transport.connect(peers, roles.hosts, receives_from=peers if role == "encoder" else [])
        return transport
    if transport.name != "mpi":
        from ..transport.mpi import MpiTransport
        return MpiTransport(transport.comm)      # the UCX one opened nothing before connect(): just drop it
    return transport


@dataclass
class _EarlyBuild:
    spec: ModelSpec
    device: str
    encoders: list | None
    error: Exception | None
    building_at: float          # imports and MPI done: building starts
    built_at: float


def _build_early(cfg: JobConfig, kind: JobKind, ranks: list[RankInfo], rank: int) -> _EarlyBuild | None:
    """A rank that will be an encoder rank builds its encoders (weights, compiled kernels, CUDA graphs: most of
    start-up) while rank 0 plans the job, which does not need them. The roles' encoder ranks follow from the world
    alone (the rate plan only trims tokenizers), so each rank knows its own. Not when the output already holds a
    complete job, which a rerun is most often told there is nothing to do in."""
    if not kind.has_encoders or (OutputDir(cfg.output).complete() and not cfg.overwrite):
        return None
    try:
        roles = plan_roles(ranks, cfg.tokenizer_ranks or None)
        if rank not in roles.encoders:
            return None
        spec = model_spec(cfg)
        device = device_for(rank, roles, ranks) if cfg.device == "auto" else cfg.device
    except HpcEmbedError:
        return None             # rank 0's planning finds the same mistake and reports it
    building_at = time.time()
    try:
        return _EarlyBuild(spec, device, build_encoders(cfg, spec, device), None, building_at, time.time())
    except Exception as exc:    # noqa: BLE001 - raised again in the role, once the plan says the job runs
        return _EarlyBuild(spec, device, None, exc, building_at, time.time())


def _run_worker(cfg: JobConfig, kind: JobKind, transport: Transport, plan: RunPlan, ranks: list[RankInfo],
                role: str, role_comm, early: _EarlyBuild | None, startup: dict[str, float]) -> None:
    """`role_comm`: the communicator of the ranks of this rank's role (None where it needs none)."""
    from ..transport.mpi import MpiAlltoall
    if role == "tokenizer":
        os.environ.setdefault("RAYON_NUM_THREADS", "1")      # one core per tokenizer rank
        def body():
            worker = tokenizer_rank(cfg, kind, transport, plan.roles, plan.spec, plan.committed_shards,
                                    plan.batch_tokens, MpiAlltoall(role_comm), plan.digest_seed, plan.dedup)
            settle()
            worker.run()
    else:
        device = device_for(transport.rank, plan.roles, ranks) if cfg.device == "auto" else cfg.device
        if device == "cpu" and not cfg.rehearse:
            import torch
            torch.set_num_threads(1)                        # CPU encoder ranks share the cores with tokenizers
        def body():
            if early is not None and early.spec == plan.spec and early.device == device:
                if early.error is not None:
                    raise early.error
                encoders, startup["building"], startup["built"] = early.encoders, early.building_at, early.built_at
            else:
                startup["building"] = time.time()
                encoders, startup["built"] = build_encoders(cfg, plan.spec, device), time.time()
            if plan.fp8_sample:
                check_fp8(cfg, plan.spec, plan.fp8_sample, encoders)
                startup["fp8_checked"] = time.time()
            ranges = plan.ranges
            if plan.calibration:
                ranges = agree(calibrate_for(cfg, plan.spec, plan.calibration, encoders[0]), role_comm)
                startup["calibrated"] = time.time()
            worker = encoder_rank(cfg, transport, plan.roles, encoders, plan.spec, startup, ranges, plan.dedup,
                                  plan.reuse)
            settle()
            worker.run()
    run_role(role, transport, plan.roles.conductor, body)


def _run_conductor(cfg: JobConfig, transport: Transport, plan: RunPlan, ranks: list[RankInfo],
                   setup: JobSetup, startup: dict[str, float]) -> dict:
    roles = plan.roles
    for r in range(transport.size):
        log.info("rank %d on %s (pid %d): %s", r, ranks[r].host, ranks[r].pid, roles.role_of(r))
    idle = transport.size - 1 - len(roles.tokenizers) - len(roles.encoders)
    subs = len(roles.subconductors)
    idle = idle - subs
    log.info("role map: 1 conductor, %s%d tokenizer, %d encoder ranks%s", f"{subs} sub-conductor, " if subs else "",
             len(roles.tokenizers), len(roles.encoders), f", {idle} idle" if idle else "")
    progress = Progress(setup.plan.total_rows, cfg.progress, cfg.progress_interval, setup.rows_resumed)
    start = time.process_time()
    core = ConductorCore(roles, setup.plan, setup.output, setup.output.ledger(), setup.resumed,
                         skip_invalid=cfg.on_invalid == "skip", name_ranks=True, progress=progress,
                         ranges_due=bool(plan.calibration), steal_rows=cfg.steal_rows)
    try:
        result = run_conductor(core, transport, progress)
        me = ControlStats(0, "conductor", ranks[0].host, busy_seconds=time.process_time() - start,
                          messages_handled=result.messages_handled, handling_seconds=result.handling_seconds,
                          handling_cpu_seconds=result.handling_cpu_seconds, startup=startup)
        entries = [me.as_manifest()] + [result.reports[r].as_manifest() for r in sorted(result.reports)]
        device = job_device(cfg, ranks) if setup.kind.has_encoders else "cpu"
        return finish(cfg, setup, result, entries, transport.name, device, setup.dedup(cfg, roles))
    except HpcEmbedError as exc:
        print(f"hpcembed: error: {exc}", file=sys.stderr, flush=True)
        setup.output.lock.release()         # MPI_Abort ends this process: no finally runs after it
        transport.abort(str(exc), exc.exit_code)
        raise
    except BaseException as exc:
        print(f"hpcembed: internal error on the conductor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        setup.output.lock.release()
        transport.abort(str(exc), 1)
        raise
