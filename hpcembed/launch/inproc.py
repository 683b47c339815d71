"""The in-process launcher: one process, no MPI. The conductor runs on the main thread; one tokenizer rank and (for
an embedding job) one encoder rank run as threads over the in-process transport. The roles are the same cores and
drivers an MPI job runs."""
from __future__ import annotations

import platform
import threading

from ..config import JobConfig
from ..engine import resolve_device
from ..progress import Progress
from ..protocol.conductor import ConductorCore
from ..roles.common import run_role
from ..roles.conductor import run_conductor
from ..signals import STOP
from ..topology import RoleMap
from ..transport.inproc import InprocNetwork
from .build import build_encoders, calibrate_for, check_fp8, encoder_rank, tokenizer_rank
from .kinds import JobKind
from .setup import already_complete, finish, prepare

_JOIN_SECONDS = 30


def run_in_process(cfg: JobConfig, kind: JobKind) -> dict:
    device = resolve_device(cfg.device) if kind.has_encoders else "cpu"
    setup = prepare(cfg, kind, device)
    try:
        return _run(cfg, kind, setup, device)
    finally:
        setup.output.lock.release()


def _run(cfg: JobConfig, kind: JobKind, setup, device: str) -> dict:
    if setup.status == "complete":
        return already_complete(setup)
    STOP.install()
    roles = RoleMap(conductor=0, tokenizers=[1], encoders=[2] if kind.has_encoders else [])
    network = InprocNetwork(3)
    dedup = setup.dedup(cfg, roles)
    reuse = setup.reuse_shards
    ranks = [("tokenizer", tokenizer_rank(cfg, kind, network.endpoint(1), roles, setup.spec,
                                          setup.committed_shards(), cfg.batch_tokens_for(device),
                                          digest_seed=setup.digest_seed, dedup=dedup[0]))]
    if kind.has_encoders:
        encoders = build_encoders(cfg, setup.spec, device)
        if setup.fp8_sample(cfg):
            check_fp8(cfg, setup.spec, setup.fp8_sample(cfg), encoders)
        units, ranges = setup.calibration(cfg)
        if units:
            ranges = calibrate_for(cfg, setup.spec, units, encoders[0])
        ranks.append(("encoder", encoder_rank(cfg, network.endpoint(2), roles, encoders, setup.spec,
                                              ranges=ranges, dedup=dedup[0], reuse=reuse)))
    threads = [threading.Thread(target=run_role, args=(name, rank.transport, 0, rank.run), name=name, daemon=True)
               for name, rank in ranks]
    for th in threads:
        th.start()
    conductor_t = network.endpoint(0)
    progress = Progress(setup.plan.total_rows, cfg.progress, cfg.progress_interval, setup.rows_resumed)
    core = ConductorCore(roles, setup.plan, setup.output, setup.output.ledger(), setup.resumed,
                         skip_invalid=cfg.on_invalid == "skip", progress=progress, steal_rows=cfg.steal_rows)
    try:
        result = run_conductor(core, conductor_t, progress)
    except BaseException as exc:
        conductor_t.abort(str(exc), getattr(exc, "exit_code", 1))
        raise
    finally:
        for th in threads:
            th.join(timeout=_JOIN_SECONDS)
    # One process: its single entry sums the roles it played. Rows, tokens and busy time are those of the last
    # stage (the encoder's in an embedding job); the tokenizer's busy time is kept beside them.
    reports = [result.reports[r] for r in sorted(result.reports)]
    entry: dict = {}
    for stats in reports:
        entry.update(stats.as_manifest())
    if len(reports) > 1:
        entry["tokenizer_busy_seconds"] = round(result.reports[1].busy_seconds, 3)
    entry.update(rank=0, role="+".join(["conductor"] + [s.role for s in reports]), host=platform.node())
    return finish(cfg, setup, result, [entry], "inproc", entry.get("device", "cpu"), dedup)
