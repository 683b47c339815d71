"""Assemble and run a job: resolve inputs, plan units, start the roles over a transport, write the manifest.

Two kinds of job share all of it: an embedding job (`hpcembed run`: conductor, tokenizer and gpu ranks, Parquet
embeddings out) and a tokenize job (`hpcembed tokenize`: conductor and tokenizer ranks only, each writing its
own token shards; see io/tokens.py). An embedding job reads a token directory like any other input.

One process (no MPI): the conductor runs on the main thread, one tokenizer and one gpu role run as threads
over the in-process transport. Under mpiexec/srun: every rank runs the role the world plan gives it over the
MPI transport. Both run the same role loops; nothing is copied between the two paths.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass

from . import __version__
from .config import JobConfig
from .engine import ModelSpec, build_encoder, default_model_dir, resolve_device
from .engine.instances import InstancePool
from .errors import ConfigError, HpcEmbedError, InputError
from .io.readers import Columns
from .io.ledger import Ledger, LedgerState, model_identity
from .io.sources import Plan, plan_job, resolve_inputs
from .io.writer import OutputDir
from .progress import Progress
from .roles.common import RoleMap, run_role
from .roles.conductor import Conductor, JobResult
from .roles.gpu import GpuRole
from .roles.tokenizer import TokenizerRole, TokenWriterRole
from .signals import STOP
from .slurm import SlurmTask
from .tokenize import HFTokenizer, make_tokenizer
from .transport.base import Transport

log = logging.getLogger("hpcembed")


@dataclass
class Setup:
    spec: ModelSpec
    plan: Plan
    output: OutputDir
    started: float
    status: str                     # 'fresh', 'resume' or 'complete' (io/writer.py OutputDir.open)
    resumed: LedgerState
    dtype: str
    tokenize: bool                  # a tokenize job (token shards out) rather than an embedding job
    tokenizer: dict                 # io/tokens.py tokenizer_identity of the model's tokenizer

    def committed_shards(self) -> list[tuple[int, str, int]]:
        """(unit, path, position) of every shard earlier runs committed, positions ordering their rows.
        A tokenize job checks no ids (the embedding job does), so it needs none."""
        if self.tokenize:
            return []
        out = []
        for k, (unit, name) in enumerate(sorted((u.unit, name) for u in self.resumed.units.values()
                                                for name in u.shards)):
            out.append((unit, str(self.output.path / name), k << 32))
        return out


def resolved_dtype(cfg: JobConfig, device: str) -> str:
    return cfg.dtype if cfg.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")


def fingerprint(cfg: JobConfig, spec: ModelSpec, plan: Plan, dtype: str) -> dict:
    """What makes two runs the same job, so a rerun may resume the other's output: same inputs (path, size,
    rows), same model and embedding settings, same work units."""
    inputs = []
    for f in plan.files:
        path = os.path.abspath(f.path)
        size = os.path.getsize(path) if os.path.exists(path) else None
        inputs.append([path, size, plan.file_rows.get(f.index)])
    return {"inputs": inputs, "model": spec.name, "model_id": model_identity(spec.path), "pooling": spec.pooling,
            "normalize": spec.normalize, "max_seq_length": spec.max_seq_length, "dtype": dtype,
            "text_column": cfg.text_column, "id_column": cfg.id_column, "unit_rows": cfg.unit_rows}


def tokenize_fingerprint(cfg: JobConfig, spec: ModelSpec, plan: Plan, tokenizer: dict) -> dict:
    """What makes two tokenize runs the same job. The backend is not part of it: every backend gives the same
    ids, so a job may resume with another."""
    job = fingerprint(cfg, spec, plan, "")
    return {"kind": "tokens", "inputs": job["inputs"], "tokenizer": tokenizer, "text_column": cfg.text_column,
            "id_column": cfg.id_column, "unit_rows": cfg.unit_rows}


def _check_token_inputs(cfg: JobConfig, tokenize: bool, tokenizer: dict) -> None:
    from .io.tokens import check_tokenizer_matches, read_token_manifest
    for pattern in cfg.input:
        manifest = read_token_manifest(pattern) if os.path.isdir(pattern) else None
        if manifest is None:
            continue
        if tokenize:
            raise ConfigError(f"input {pattern} is already a token directory; embed it with `hpcembed run --input "
                              f"{pattern}`")
        check_tokenizer_matches(pattern, manifest.get("tokenizer", {}), tokenizer)


def prepare(cfg: JobConfig, device: str, tokenize: bool = False) -> Setup:
    """Everything the conductor decides before work starts. Raises HpcEmbedError for the user."""
    from .io.tokens import tokenizer_identity
    started = time.time()
    spec = ModelSpec.load(cfg.model or default_model_dir(), pooling=cfg.pooling, normalize=cfg.normalize,
                          max_seq_length=cfg.max_seq_length)
    tokenizer = tokenizer_identity(HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase),
                                   spec.name)
    _check_token_inputs(cfg, tokenize, tokenizer)
    files = resolve_inputs(cfg.input)
    plan = plan_job(files, cfg.unit_rows, skip_unreadable=cfg.on_invalid == "skip")
    dtype = resolved_dtype(cfg, device)
    output = OutputDir(cfg.output, tokens=tokenize)
    job = tokenize_fingerprint(cfg, spec, plan, tokenizer) if tokenize else fingerprint(cfg, spec, plan, dtype)
    status, resumed = output.open(job, [e.as_reject() for e in plan.unreadable], cfg.overwrite)
    log.info("%d input files, %s rows in %d work units; %s %s (%s, max %d tokens)", len(files),
             f"{plan.total_rows:,}", len(plan.units), "tokenizer of" if tokenize else "model", spec.name,
             f"tokenizer {tokenizer['fingerprint']}" if tokenize else f"{spec.pooling} pooling", spec.max_seq_length)
    if status == "resume":
        log.info("resuming %s: %d of %d units (%s rows) already committed", output.path, len(resumed.units),
                 len(plan.units), f"{resumed.rows:,}")
    return Setup(spec, plan, output, started, status, resumed, dtype, tokenize, tokenizer)


def already_complete(setup: Setup) -> dict:
    log.info("%s already holds the complete output of this job (_SUCCESS); nothing to do", setup.output.path)
    manifest = setup.output.read_manifest()
    manifest["already_complete"] = True
    return manifest


def tokenizer_role(cfg: JobConfig, transport: Transport, roles: RoleMap, spec: ModelSpec,
                   committed_shards: list[tuple[int, str, int]], peers=None,
                   tokens_to: OutputDir | None = None) -> TokenizerRole:
    """The tokenizer role of an embedding job, or with `tokens_to` that of a tokenize job."""
    backend = make_tokenizer(spec.path, spec.max_seq_length, spec.lowercase, cfg.tokenizer_backend)
    columns = Columns(cfg.text_column, cfg.id_column)
    if tokens_to is not None:
        return TokenWriterRole(transport, roles, backend, columns, cfg.chunk_rows, cfg.on_invalid == "skip",
                               tokens_to)
    # Each tokenizer checks its share of the shards earlier runs committed against the new rows.
    index = roles.tokenizers.index(transport.rank)
    share = committed_shards[index:: len(roles.tokenizers)]
    return TokenizerRole(transport, roles, backend, columns, cfg.chunk_rows, skip_invalid=cfg.on_invalid == "skip", peers=peers, committed_shards=share)


def gpu_role(cfg: JobConfig, transport: Transport, roles: RoleMap, spec: ModelSpec, output: OutputDir,
             device: str) -> GpuRole:
    device = resolve_device(device)
    graph_tokens = cfg.batch_tokens_for(device) if cfg.cuda_graphs is not False else 0
    build = lambda: build_encoder(spec, device, cfg.dtype, cfg.engine, cfg.compile, cfg.exact_gelu,  # noqa: E731
                                  graph_tokens)
    first = build()
    # On CPU a second instance would only split the same cores between two copies of the weights.
    count = cfg.instances_per_gpu if first.device_name.startswith("cuda") else 1
    encoders = [first] + [build() for _ in range(count - 1)]
    return GpuRole(transport, roles, InstancePool(encoders), output, cfg.batch_tokens_for(encoders[0].device_name),
                   cfg.window_batches, cfg.credits)


def job_device(cfg: JobConfig, ranks) -> str:
    """The device kind of an MPI job's gpu ranks, as the conductor sees it from every rank's GPU count."""
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if any(i.cuda_devices for i in ranks) else "cpu"


def finish(cfg: JobConfig, setup: Setup, result: JobResult, ranks: list[dict], transport: str, device: str) -> dict:
    manifest = build_manifest(cfg, setup, result, ranks, transport, device, setup.dtype)
    setup.output.write_manifest(manifest)
    if manifest["complete"]:
        setup.output.write_success()
    return manifest


# --- one process ----------------------------------------------------------------------------------------------

def run_single_process(cfg: JobConfig, tokenize: bool = False) -> dict:
    from .transport.inproc import InprocNetwork
    setup = prepare(cfg, "cpu" if tokenize else resolve_device(cfg.device), tokenize)
    if setup.status == "complete":
        return already_complete(setup)
    STOP.install()
    roles = RoleMap(conductor=0, tokenizers=[1], gpus=[] if tokenize else [2])
    network = InprocNetwork(3)
    tokenizer = tokenizer_role(cfg, network.endpoint(1), roles, setup.spec, setup.committed_shards(),
                               tokens_to=setup.output if tokenize else None)
    members = [("tokenizer", tokenizer)]
    if not tokenize:
        gpu = gpu_role(cfg, network.endpoint(2), roles, setup.spec, setup.output, cfg.device)
        members.append(("gpu", gpu))
    threads = [threading.Thread(target=run_role, args=(name, role.t, 0, role.run), name=name, daemon=True)
               for name, role in members]
    for th in threads:
        th.start()
    conductor_t = network.endpoint(0)
    progress = Progress(setup.plan.total_rows, cfg.progress, cfg.progress_interval, setup.resumed.rows)
    try:
        result = Conductor(conductor_t, roles, setup.plan, setup.output, progress, Ledger(setup.output.path),
                           setup.resumed, skip_invalid=cfg.on_invalid == "skip").run()
    except BaseException as exc:
        conductor_t.abort(str(exc), getattr(exc, "exit_code", 1))
        progress.close()
        raise
    finally:
        for th in threads:
            th.join(timeout=30)
    tok_report = result.reports[1]
    if tokenize:
        ranks = [{"rank": 0, "role": "conductor+tokenizer", "host": platform.node(), "rows": tok_report.rows,
                  "tokens": tok_report.tokens, "busy_seconds": round(tok_report.busy_seconds, 3),
                  **tok_report.encoder}]
        return finish(cfg, setup, result, ranks, "inproc", "cpu")
    # One process: its single entry sums the roles it played; busy time is the encoder's.
    gpu_report = result.reports[2]
    ranks = [{"rank": 0, "role": "conductor+tokenizer+gpu", "host": platform.node(), "rows": gpu_report.rows,
              "tokens": gpu_report.tokens, "busy_seconds": round(gpu_report.busy_seconds, 3),
              "tokenizer_busy_seconds": round(tok_report.busy_seconds, 3), **tok_report.encoder, **gpu_report.encoder}]
    encoder = gpu.pool.encoders[0]
    return finish(cfg, setup, result, ranks, "inproc", encoder.device_name)


# --- MPI ------------------------------------------------------------------------------------------------------

def run_mpi(cfg: JobConfig, tokenize: bool = False) -> dict | None:
    """Run this rank's role. Returns the manifest on the conductor, None elsewhere. Any failure on any rank
    ends the whole world (MPI_Abort) after the conductor prints it: allocation hours are not left to hang."""
    from .transport.mpi import MpiAlltoall
    from .world import device_for, gather_ranks, plan_roles
    transport = _open_transport(cfg.transport if not tokenize else "mpi")
    comm, rank = transport.comm, transport.rank
    slurm = SlurmTask.from_environ()
    if slurm is not None:
        slurm.check_world(transport.size)
    ranks = gather_ranks(comm)
    STOP.install(announce=rank == 0)
    decision: tuple
    if rank == 0:
        try:
            setup = prepare(cfg, "cpu" if tokenize else job_device(cfg, ranks), tokenize)
            roles = (RoleMap(conductor=0, tokenizers=list(range(1, len(ranks))), gpus=[],
                             hosts={r.rank: r.host for r in ranks}) if tokenize
                     else plan_roles(ranks, cfg.tokenizer_ranks or None))
            if not tokenize and setup.status != "complete":
                roles = _plan_by_rates(cfg, setup, roles, ranks)
            data_path = _choose_data_path(cfg.transport, transport, roles)
            decision = ("complete",) if setup.status == "complete" else ("ok", roles, setup.spec,
                                                                         setup.committed_shards(), data_path)
        except HpcEmbedError as exc:
            decision = ("error", str(exc), exc.exit_code)
    else:
        decision = ()
    decision = comm.bcast(decision, root=0)
    log.debug("rank %d: setup decision %s", rank, decision[0])
    if decision[0] == "error":
        if rank == 0:
            raise _Reported(decision[1], decision[2])
        return None
    if decision[0] == "complete":
        return already_complete(setup) if rank == 0 else None
    roles, spec, committed_shards, data_path = decision[1:]
    role = roles.role_of(rank)
    if data_path == "ucx":           # collective: ranks off the data path take part with no peers
        peers = (roles.gpus_of(rank) if role == "tokenizer" else roles.tokenizers_of(rank) if role == "gpu" else [])
        transport.connect(peers, roles.hosts, receives_from=peers if role == "gpu" else [])
    elif transport.name != "mpi":
        from .transport.mpi import MpiTransport
        transport = MpiTransport(transport.comm)     # the UCX one opened nothing before connect(): just drop it
    # The tokenizer ranks' own communicator, for the cross-rank duplicate-id exchange (collective: all call it).
    tokenizer_comm = comm.Split(0 if role == "tokenizer" else 1, rank)
    if role == "conductor":
        manifest = _run_conductor(cfg, transport, roles, ranks, setup, tokenize)
        _quiet_barrier(comm)
        transport.close()
        return manifest
    if role == "idle":
        _quiet_barrier(comm)
        transport.close()
        return None
    if role == "tokenizer":
        os.environ.setdefault("RAYON_NUM_THREADS", "1")      # one core per tokenizer rank
        peers = MpiAlltoall(tokenizer_comm)
        tokens_to = OutputDir(cfg.output, tokens=True) if tokenize else None
        body = lambda: tokenizer_role(cfg, transport, roles, spec, committed_shards, peers,  # noqa: E731
                                      tokens_to).run()
    else:
        device = device_for(rank, roles, ranks) if cfg.device == "auto" else cfg.device
        if device == "cpu":
            import torch
            torch.set_num_threads(1)                        # CPU gpu ranks share the cores with tokenizers
        body = lambda: gpu_role(cfg, transport, roles, spec, OutputDir(cfg.output), device).run()  # noqa: E731
    run_role(role, transport, roles.conductor, body)
    transport.flush()
    # Nobody leaves early: a gpu rank may still be returning credits to a finished tokenizer, and sending to
    # a rank that has finalized MPI is fatal. On failure the conductor aborts the world instead.
    _quiet_barrier(comm)
    transport.close()
    return None


def _open_transport(choice: str):
    """The MPI transport, or the UCX one where it may be used. Decided before mpi4py.MPI is first imported,
    because the UCX bindings must load first (see transport/ucx.py)."""
    from .transport.mpi import MpiTransport
    if choice != "mpi":
        from .transport.ucx import UcxTransport, ucx_available
        if ucx_available():
            return UcxTransport()
    return MpiTransport()


def _choose_data_path(choice: str, transport, roles: RoleMap) -> str:
    """'ucx' or 'mpi' for the token batches: explicit, or for auto, ucx when any batch crosses a node."""
    if choice == "mpi":
        return "mpi"
    if transport.name != "ucx":
        if choice == "ucx":
            raise ConfigError("--transport ucx: the ucxx bindings do not import here; pip install 'hpcembed[ucx]' "
                              "(the ucxx-cu12 wheel), or use --transport mpi")
        return "mpi"
    crosses = any(roles.host_of(t) != roles.host_of(g) for t in roles.tokenizers for g in roles.gpus_of(t))
    return "ucx" if choice == "ucx" or crosses else "mpi"


def _quiet_barrier(comm) -> None:
    """A barrier that sleeps while it waits: a blocking MPI barrier spins a core, which finished or idle ranks
    would take from the tokenizers still working. Every rank must use this one (blocking and non-blocking
    collectives do not match each other)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def _plan_by_rates(cfg: JobConfig, setup: Setup, roles: RoleMap, ranks) -> RoleMap:
    """On CUDA (or when --gpu-tokens-per-s states the encoder's rate), keep only the tokenizer ranks the gpu
    ranks need at measured rates; --tokenizer-ranks fixes the split instead. Token-directory input is only
    read, not tokenized, so every tokenizer rank is kept."""
    from .io.readers import read_unit
    from .world import measure_tokenizer_rate, plan_tokenizers
    if cfg.tokenizer_ranks or not (cfg.gpu_tokens_per_s or job_device(cfg, ranks).startswith("cuda")):
        return roles
    units = [u for u in setup.plan.units if u.file.format != "tokens"]
    if not units:
        return roles
    texts: list[str] = []
    try:
        for chunk in read_unit(units[0], Columns(cfg.text_column, cfg.id_column), 1024):
            texts.extend(chunk.texts)
            if len(texts) >= 4096:
                break
    except InputError:
        pass            # the unit's tokenizer reports it; plan on what was read, or on a stand-in text
    os.environ.setdefault("RAYON_NUM_THREADS", "1")      # measure what one tokenizer rank (one core) does
    backend = make_tokenizer(setup.spec.path, setup.spec.max_seq_length, setup.spec.lowercase,
                             cfg.tokenizer_backend)
    rate = measure_tokenizer_rate(backend, texts or ["a short text"], seconds=1.0)
    planned, plan = plan_tokenizers(roles, ranks, rate, cfg.gpu_tokens_per_s)
    log.info("%s (%s backend)", plan.describe(), backend.name)
    return planned


class _Reported(HpcEmbedError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _run_conductor(cfg, transport, roles: RoleMap, ranks, setup: Setup, tokenize: bool) -> dict:
    for r in range(transport.size):
        log.info("rank %d on %s (pid %d): %s", r, ranks[r].host, ranks[r].pid, roles.role_of(r))
    idle = transport.size - 1 - len(roles.tokenizers) - len(roles.gpus)
    log.info("role map: 1 conductor, %d tokenizer, %d gpu ranks%s", len(roles.tokenizers), len(roles.gpus),
             f", {idle} idle" if idle else "")
    progress = Progress(setup.plan.total_rows, cfg.progress, cfg.progress_interval, setup.resumed.rows)
    start = time.process_time()
    try:
        result = Conductor(transport, roles, setup.plan, setup.output, progress, Ledger(setup.output.path),
                           setup.resumed, name_ranks=True, skip_invalid=cfg.on_invalid == "skip").run()
        reports = [{"rank": 0, "role": "conductor", "host": ranks[0].host, "rows": 0, "tokens": 0,
                    "busy_seconds": round(time.process_time() - start, 3)}]
        for r in sorted(result.reports):
            rep = result.reports[r]
            reports.append({"rank": r, "role": rep.role, "host": rep.host, "rows": rep.rows, "tokens": rep.tokens,
                            "busy_seconds": round(rep.busy_seconds, 3), **rep.encoder})
        return finish(cfg, setup, result, reports, transport.name, "cpu" if tokenize else job_device(cfg, ranks))
    except HpcEmbedError as exc:
        progress.close()
        print(f"hpcembed: error: {exc}", file=sys.stderr, flush=True)
        transport.abort(str(exc), exc.exit_code)
        raise
    except BaseException as exc:
        progress.close()
        print(f"hpcembed: internal error on the conductor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        transport.abort(str(exc), 1)
        raise


def build_manifest(cfg: JobConfig, setup: Setup, result: JobResult, ranks: list[dict], transport: str,
                   device: str, dtype: str) -> dict:
    spec, plan, wall = setup.spec, setup.plan, result.wall_seconds
    complete = result.rows_written + result.rejected_rows == plan.total_rows
    what = ({"kind": "tokens", "tokenizer": setup.tokenizer, "model": spec.name, "model_path": spec.path}
            if setup.tokenize else
            {"kind": "embeddings", "model": spec.name, "model_path": spec.path, "architecture": spec.architecture,
             "dim": spec.dim, "dtype": dtype, "device": device, "pooling": spec.pooling,
             "normalize": spec.normalize, "max_seq_length": spec.max_seq_length, "tokenizer": setup.tokenizer})
    return {
        "hpcembed_version": __version__,
        "created": datetime.datetime.fromtimestamp(setup.started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        **what,
        "text_column": cfg.text_column, "id_column": cfg.id_column or None, "on_invalid": cfg.on_invalid,
        "transport": transport,
        "settings": {"unit_rows": cfg.unit_rows, "chunk_rows": cfg.chunk_rows, "credits": cfg.credits,
                     "window_batches": cfg.window_batches, "instances_per_gpu": cfg.instances_per_gpu,
                     "max_batch_tokens": cfg.max_batch_tokens or None,
                     # The units as planned, [rows, count] runs in plan order: a Parquet unit is whole row
                     # groups, so its size is the file's, not always unit_rows (scaling studies replay these).
                     "unit_sizes": _runs(u.row_stop - u.row_start for u in plan.units)},
        "inputs": [{"path": f.path, "format": f.format, "rows": plan.file_rows.get(f.index)} for f in plan.files],
        "shards": sorted(result.shards, key=lambda s: s["path"]),
        "rows": plan.total_rows, "rows_written": result.rows_written, "rejected_rows": result.rejected_rows,
        "rows_resumed": result.rows_resumed, "units_resumed": result.units_resumed,
        "rows_written_this_run": result.rows_written - result.rows_resumed,
        "stopped_early": result.stopped_early or None,
        "unreadable_files": [e.path for e in plan.unreadable],
        "tokens": result.tokens,
        "wall_seconds": round(wall, 3),
        "job_seconds": round(time.time() - setup.started, 3),
        "texts_per_s": round((result.rows_written - result.rows_resumed) / wall, 1) if wall else None,
        "tokens_per_s": round(result.tokens / wall, 1) if wall else None,
        **_steady_state(result, ranks),
        "ranks": ranks,
    }


def _runs(values) -> list[list[int]]:
    """Run-length code: [[value, count], ...] in order."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _steady_state(result: JobResult, ranks: list[dict]) -> dict:
    """Throughput once the gpu ranks were ready (model loaded, compiled, graphs captured) to the last commit,
    and how busy their encoders were in that time: start-up costs stay out of the rate a long job runs at."""
    ready = [r["ready_at"] for r in ranks if "ready_at" in r]
    if not ready:
        return {}
    steady = result.ended_at - min(ready)
    if steady <= 0:
        return {}
    rows = result.rows_written - result.rows_resumed
    busy = [r["stage_busy_seconds"] / steady for r in ranks if "stage_busy_seconds" in r]
    return {"steady_seconds": round(steady, 3), "steady_texts_per_s": round(rows / steady, 1),
            "steady_tokens_per_s": round(result.tokens / steady, 1),
            "gpu_busy": round(sum(busy) / len(busy), 4) if busy else None}
