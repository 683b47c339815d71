"""The record of a run: what each rank reports (RankStats), what the conductor ends with (JobResult), and the
manifest written beside the output (`_manifest.json`), whose schema lives only here.

Rank entries in the manifest are flat: the common fields, then the role's own. The encoder role was called "gpu"
before 0.2; readers of older manifests go through `ranks_by_role`, which reads both names.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from typing import Iterable

from . import __version__


@dataclass
class RankStats:
    rank: int
    role: str                       # conductor, tokenizer, encoder (or several, joined by +, in one process)
    host: str
    rows: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0

    def as_manifest(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["busy_seconds"] = round(self.busy_seconds, 3)
        return out


@dataclass
class TokenizerStats(RankStats):
    tokenizer_backend: str = ""
    rows_budtiktok: int | None = None           # budtiktok backend: rows it tokenized itself
    rows_hf_fallback: int | None = None         # ... and rows it handed to HF (see tokenize/budtiktok_backend.py)
    texts_truncated: int | None = None          # texts cut at max_seq_length (None: a token directory's rows)
    texts_chunked: int | None = None            # --chunk-tokens: texts read, those longer than one window,
    texts_split: int | None = None              # and the windows embedded
    chunks: int | None = None
    started_at: float = 0.0                     # epoch seconds the rank asked for its first unit,
    finished_at: float = 0.0                    # and had every credit back after its last unit
    first_formed_at: float = 0.0                # epoch seconds its first batch was cut (before it was sent),
    first_sent_at: float = 0.0                  # and taken in by an encoder rank (0: it sent none)
    read_ahead_rows: int = 0                    # rows tokenized and held before any encoder rank granted credit
    granted_at: float = 0.0                     # epoch seconds the first credit came (0: none did),
    first_answer_at: float = 0.0                # and (--dedup) the first answer to a claim
    batches_sent: dict[str, int] = field(default_factory=dict)     # encoder rank -> batches
    # Time outside busy: unit_wait, credit_wait, claim_wait, send, read, finish, untracked (roles/tokenizer.py).
    other_seconds: dict[str, float] = field(default_factory=dict)

    def as_manifest(self) -> dict:
        out = super().as_manifest()
        out["other_seconds"] = {k: round(v, 3) for k, v in self.other_seconds.items()}
        return out


@dataclass
class ControlStats(RankStats):
    """A control rank (the conductor, a sub-conductor). busy_seconds is its process CPU time, which includes the
    transport's polling; `handling_seconds` only the time from a message's arrival to its replies sent, over
    `messages_handled` messages (its cost per message under the job's fan-in), and `handling_cpu_seconds` the
    CPU its thread spent in that time."""
    messages_handled: int = 0
    handling_seconds: float = 0.0
    handling_cpu_seconds: float = 0.0
    startup: dict[str, float] | None = None     # the conductor's start-up marks (launch/mpi.py), epoch seconds

    def as_manifest(self) -> dict:
        out = super().as_manifest()
        out["handling_seconds"] = round(self.handling_seconds, 4)
        out["handling_cpu_seconds"] = round(self.handling_cpu_seconds, 4)
        if self.startup is not None:
            out["startup"] = {k: round(v, 3) for k, v in self.startup.items()}
        return out


@dataclass
class SubConductorStats(ControlStats):
    units_committed: int = 0                    # units it found complete and sent on to the conductor,
    commit_batches: int = 0                     # in this many UnitsCommitted messages


@dataclass
class EncoderStats(RankStats):
    engine: str = ""
    device: str = ""
    dtype: str = ""
    attention: str = ""                         # the varlen engine's attention kernel (triton, flash, padded)
    fused_ops: str = ""                         # and its ops between the matmuls (triton, compile, eager)
    instances: int = 0
    fp8_min_cosine: float | None = None         # --dtype fp8: the fidelity check's minimum cosine against bf16
    ready_at: float = 0.0                       # epoch seconds the encoders were built and the rank took work
    stage_busy_seconds: float = 0.0             # time at least one instance was encoding
    loop_seconds: dict[str, float] = field(default_factory=dict)    # where the role loop's time went
    # Start-up: epoch seconds at which the rank reached each step (process_started, building, plan_received,
    # built, ready, first_batch), and where building the encoders went (weights, compile, graphs; summed over
    # instances).
    startup: dict[str, float] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)
    # Host cost: CPU seconds of the rank's process (every thread: loop, instances, shard writer) from ready to
    # the end, and the batches it encoded in that time.
    host_cpu_seconds: float = 0.0
    batches: int = 0
    loop_cpu_seconds: float = 0.0               # the CPU seconds of the loop thread alone, from ready
    # The end of its work: epoch seconds its last batch came back from an encoder, its last part was complete
    # (handed to a writer thread) and its last shard was written, and the seconds its writer threads spent
    # assembling, checksumming and writing shards (summed over threads).
    last_encoded_at: float = 0.0
    last_completed_at: float = 0.0
    last_written_at: float = 0.0
    writer_seconds: float = 0.0
    rows_deduplicated: int | None = None        # --dedup: rows written with the embedding of an earlier repeat,
    rows_reused: int | None = None              # and with one from an earlier output (--reuse)
    reuse_shards_ignored: int | None = None     # --reuse shards left out as damaged
    dedup_full: bool | None = None              # --dedup-memory was reached: later texts went unrecorded
    dedup_seconds: dict[str, float] | None = None   # --dedup: the loop's wall and CPU seconds on claims, references

    def as_manifest(self) -> dict:
        out = super().as_manifest()
        out["stage_busy_seconds"] = round(self.stage_busy_seconds, 3)
        out["loop_seconds"] = {k: round(v, 3) for k, v in self.loop_seconds.items()}
        out["startup"] = {k: round(v, 3) for k, v in self.startup.items()}
        out["build_seconds"] = {k: round(v, 3) for k, v in self.build_seconds.items()}
        out["host_cpu_seconds"] = round(self.host_cpu_seconds, 3)
        out["loop_cpu_seconds"] = round(self.loop_cpu_seconds, 3)
        if self.dedup_seconds is not None:
            out["dedup_seconds"] = {k: round(v, 3) for k, v in self.dedup_seconds.items()}
        out["host_ms_per_batch"] = round(1e3 * self.host_cpu_seconds / self.batches, 3) if self.batches else None
        out["host_us_per_row"] = round(1e6 * self.host_cpu_seconds / self.rows, 3) if self.rows else None
        return out


@dataclass
class JobResult:
    rows_written: int               # input rows in the output now, resumed rows included
    tokens: int                     # embedded by this run
    rejected_rows: int              # resumed rejects included
    rows_resumed: int               # committed by earlier runs of this job
    units_resumed: int
    stopped_early: str              # the signal that stopped the job, or ""
    shards: list[dict]
    reports: dict[int, RankStats]
    wall_seconds: float
    ended_at: float                 # epoch seconds
    output_rows: int = -1           # rows the shards hold, where not rows_written (a chunked job's windows)
    ranges: list | None = None      # int8/uint8 output's calibration ranges [2][dim]
    messages_handled: int = 0       # by the conductor's driver, and the time it took (manifest.ControlStats)
    handling_seconds: float = 0.0
    handling_cpu_seconds: float = 0.0


def ranks_by_role(manifest: dict) -> dict[str, list[dict]]:
    """The manifest's rank entries by role; "gpu" (manifests before 0.2) is read as "encoder"."""
    out: dict[str, list[dict]] = {}
    for r in manifest["ranks"]:
        out.setdefault("encoder" if r["role"] == "gpu" else r["role"], []).append(r)
    return out


def run_lengths(values: Iterable[int]) -> list[list[int]]:
    """[[value, count], ...] in order."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def steady_state(result: JobResult, ranks: list[dict]) -> dict:
    """Throughput once the encoder ranks were ready (model loaded, compiled, graphs captured) to the last commit,
    and how busy their encoders were in that time: start-up costs stay out of the rate a long job runs at."""
    ready = [r["ready_at"] for r in ranks if r.get("ready_at")]
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


def startup_summary(ranks: list[dict]) -> dict:
    """Seconds from the earliest encoder-rank process start to each step of start-up (the latest rank's, so the
    figure is the job's): Python, imports and MPI started; every rank's host and GPUs known (torch imported and CUDA
    initialised on one rank a machine); building the encoders begun, the plan received, encoders built, ready, and
    (--dedup) the first claim answered, the first batch taken in from a tokenizer rank and the first handed to an
    encoder. The conductor's own steps beside
    them, on the same clock."""
    marks = [r["startup"] for r in ranks
             if r.get("startup", {}).get("process_started") and r["role"] not in ("conductor", "subconductor")]
    if not marks:
        return {}
    launch = min(m["process_started"] for m in marks)
    out = {}
    for step in ("mpi_ready", "ranks_gathered", "building", "plan_received", "built", "ready", "first_claim_answered",
                 "first_batch_taken", "first_batch"):
        times = [m[step] for m in marks if step in m]
        if times:
            out[step] = round(max(times) - launch, 3)
    # The conductor's: MPI, the census, the job prepared, roles planned (the probe's rate in hand), the plan sent.
    conductor = next((r["startup"] for r in ranks if r["role"] == "conductor" and r.get("startup")), {})
    return {"startup_seconds": out,
            **({"conductor_startup_seconds": {k: round(v - launch, 3) for k, v in conductor.items()}}
               if conductor else {})}


def _summed(ranks: list[dict], *keys: str) -> dict:
    """Each key summed over the ranks that report it (absent where none does)."""
    out = {}
    for key in keys:
        values = [r[key] for r in ranks if r.get(key) is not None]
        if values:
            out[key] = sum(values)
    return out


def build_manifest(*, started: float, what: dict, config: dict, settings: dict, plan, result: JobResult,
                   ranks: list[dict], transport: str) -> dict:
    """`what`: the job kind's section (kind, model, ...); `config`: the columns and --on-invalid; `plan`: the
    io.sources Plan the units came from."""
    wall = result.wall_seconds
    complete = result.rows_written + result.rejected_rows == plan.total_rows
    return {
        "hpcembed_version": __version__,
        "created": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        **what,
        **config,
        "transport": transport,
        # The units as planned, [rows, count] runs in plan order: a Parquet unit is whole row groups, so its size
        # is the file's, not always unit_rows (scaling studies replay these).
        "settings": {**settings, "unit_sizes": run_lengths(plan.planned_sizes)},
        # Tail stealing's splits (protocol/stealing.py), resumed runs' included: the units are then more than planned.
        "units_split": plan.splits,
        "inputs": [{"path": f.path, "format": f.format, "rows": plan.file_rows.get(f.index)} for f in plan.files],
        "shards": sorted(result.shards, key=lambda s: s["path"]),
        "rows": plan.total_rows, "rows_written": result.rows_written, "rejected_rows": result.rejected_rows,
        "output_rows": result.output_rows if result.output_rows >= 0 else result.rows_written,
        **({"int8_ranges": result.ranges} if result.ranges is not None else {}),
        "rows_resumed": result.rows_resumed, "units_resumed": result.units_resumed,
        "rows_written_this_run": result.rows_written - result.rows_resumed,
        "stopped_early": result.stopped_early or None,
        "unreadable_files": [e.path for e in plan.unreadable],
        "tokens": result.tokens,
        # This run's texts cut at max_seq_length (--chunk-tokens embeds them whole), and a chunked run's windows.
        **_summed(ranks, "texts_truncated", "texts_chunked", "texts_split", "chunks", "rows_deduplicated",
                  "rows_reused"),
        "wall_seconds": round(wall, 3),
        "job_seconds": round(time.time() - started, 3),
        "texts_per_s": round((result.rows_written - result.rows_resumed) / wall, 1) if wall else None,
        "tokens_per_s": round(result.tokens / wall, 1) if wall else None,
        **steady_state(result, ranks),
        **startup_summary(ranks),
        "ranks": ranks,
    }
