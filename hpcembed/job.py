"""Assemble and run a job: resolve inputs, plan units, start the roles over a transport, write the manifest.

In one process (no MPI), the conductor runs on the main thread and one tokenizer and one gpu role run as
threads over the in-process transport: the same role loops the MPI job runs, without a copy of the logic.
"""
from __future__ import annotations

import datetime
import logging
import platform
import threading
import time

from . import __version__
from .config import JobConfig
from .engine import ModelSpec, build_encoder, default_model_dir
from .io.readers import Columns
from .io.sources import Plan, plan_job, resolve_inputs
from .io.writer import OutputDir
from .progress import Progress
from .roles.common import RoleMap, run_role
from .roles.conductor import Conductor, JobResult
from .roles.gpu import GpuRole
from .roles.tokenizer import TokenizerRole
from .tokenize import HFTokenizer
from .transport.inproc import InprocNetwork

log = logging.getLogger("hpcembed")


def load_model(cfg: JobConfig) -> ModelSpec:
    return ModelSpec.load(cfg.model or default_model_dir(), pooling=cfg.pooling, normalize=cfg.normalize,
                          max_seq_length=cfg.max_seq_length)


def run_single_process(cfg: JobConfig) -> dict:
    started = time.time()
    spec = load_model(cfg)
    files = resolve_inputs(cfg.input)
    output = OutputDir(cfg.output)
    output.prepare(cfg.overwrite)
    plan = plan_job(files, cfg.unit_rows, skip_unreadable=cfg.on_invalid == "skip")
    log.info("%d input files, %s rows in %d work units; model %s (%s pooling, max %d tokens)", len(files),
             f"{plan.total_rows:,}", len(plan.units), spec.name, spec.pooling, spec.max_seq_length)

    roles = RoleMap(conductor=0, tokenizers=[1], gpus=[2])
    network = InprocNetwork(3)
    encoder = build_encoder(spec, cfg.device, cfg.dtype)
    backend = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    tokenizer = TokenizerRole(network.endpoint(1), roles, backend, Columns(cfg.text_column, cfg.id_column),
                              cfg.chunk_rows, skip_invalid=cfg.on_invalid == "skip")
    gpu = GpuRole(network.endpoint(2), roles, encoder, output, cfg.batch_tokens_for(encoder.device_name),
                  cfg.window_batches,
                  cfg.credits)
    threads = [threading.Thread(target=run_role, args=(name, role.t, 0, role.run), name=name, daemon=True)
               for name, role in (("tokenizer", tokenizer), ("gpu", gpu))]
    for th in threads:
        th.start()
    conductor_t = network.endpoint(0)
    progress = Progress(plan.total_rows, cfg.progress, cfg.progress_interval)
    try:
        result = Conductor(conductor_t, roles, plan, output, progress, cfg.on_invalid == "skip").run()
    except BaseException as exc:
        conductor_t.abort(str(exc), getattr(exc, "exit_code", 1))
        progress.close()
        raise
    finally:
        for th in threads:
            th.join(timeout=30)

    # One process: its single entry sums the roles it played; busy time is the encoder's.
    gpu_report = result.reports[2]
    ranks = [{"rank": 0, "role": "conductor+tokenizer+gpu", "host": platform.node(), "rows": gpu_report.rows,
              "tokens": gpu_report.tokens, "busy_seconds": round(gpu_report.busy_seconds, 3),
              "tokenizer_busy_seconds": round(result.reports[1].busy_seconds, 3)}]
    manifest = build_manifest(cfg, spec, plan, result, ranks, encoder, started, transport="inproc")
    output.write_manifest(manifest)
    if manifest["complete"]:
        output.write_success()
    return manifest


def build_manifest(cfg: JobConfig, spec: ModelSpec, plan: Plan, result: JobResult, ranks: list[dict], encoder,
                   started: float, transport: str) -> dict:
    wall = result.wall_seconds
    unreadable_rows = 0   # rows of files that could not even be opened are unknown
    accounted = result.rows_written + result.rejected_rows
    complete = accounted == plan.total_rows
    return {
        "hpcembed_version": __version__,
        "created": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "model": spec.name, "model_path": spec.path, "architecture": spec.architecture,
        "dim": spec.dim, "dtype": encoder.dtype_name, "device": encoder.device_name,
        "pooling": spec.pooling, "normalize": spec.normalize, "max_seq_length": spec.max_seq_length,
        "text_column": cfg.text_column, "id_column": cfg.id_column or None, "on_invalid": cfg.on_invalid,
        "transport": transport,
        "inputs": [{"path": f.path, "format": f.format, "rows": plan.file_rows.get(f.index)} for f in plan.files],
        "shards": sorted(result.shards, key=lambda s: s["path"]),
        "rows": plan.total_rows, "rows_written": result.rows_written, "rejected_rows": result.rejected_rows,
        "unreadable_files": [e.path for e in plan.unreadable], "unreadable_rows": unreadable_rows,
        "tokens": result.tokens,
        "wall_seconds": round(wall, 3),
        "texts_per_s": round(result.rows_written / wall, 1) if wall else None,
        "tokens_per_s": round(result.tokens / wall, 1) if wall else None,
        "ranks": ranks,
    }
