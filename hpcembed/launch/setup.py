"""What the conductor decides before work starts (JobSetup), what it tells every rank (RunPlan), and how a job
ends (its manifest, then _SUCCESS when complete). Shared by both launchers."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..config import JobConfig
from ..engine.model import ModelSpec, default_dtype, default_model_dir
from ..errors import ConfigError
from ..io.digest import digest_seed
from ..io.reuse import digest_identity
from ..io.ledger import LedgerState
from ..io.sources import Plan, check_output_outside_inputs, plan_job, resolve_inputs
from ..io.tokens import tokenizer_identity
from ..io.quantize import CALIBRATED
from ..io.writer import OutputDir
from ..manifest import JobResult, build_manifest
from ..protocol.tokenizer import READ_AHEAD_BATCHES
from ..tokenize import HFTokenizer
from ..topology import RoleMap
from .calibrate import calibration_units
from .kinds import JobKind, chunking, digest_of

log = logging.getLogger("hpcembed")


@dataclass
class JobSetup:
    kind: JobKind
    spec: ModelSpec
    plan: Plan
    output: OutputDir
    started: float
    status: str                     # 'fresh', 'resume' or 'complete' (io/writer.py OutputDir.open)
    resumed: LedgerState
    dtype: str
    tokenizer: dict                 # io/tokens.py tokenizer_identity of the model's tokenizer
    digest_seed: int | None = None  # an embedding job's row-digest seed (io/digest.py); None: no digests
    digest_of: str = ""             # what rows are digested by (launch/kinds.py digest_of)
    digest_identity: dict = field(default_factory=dict)     # what the seed is made of (io/reuse.py)
    reuse_shards: list = field(default_factory=list)        # --reuse: earlier outputs' shards (io/reuse.py)

    @property
    def rows_resumed(self) -> int:
        """Input rows earlier runs committed (output rows or rejected, a chunked text's windows once)."""
        rows = {u.unit: u.rows for u in self.plan.units}
        return sum(rows[n] - u.rejected for n, u in self.resumed.units.items())

    def calibration(self, cfg: JobConfig) -> tuple[list, list | None]:
        """(units and rows to calibrate int8/uint8 output on, or the ranges already recorded) for RunPlan."""
        if cfg.output_dtype not in CALIBRATED or not self.kind.has_encoders:
            return [], None
        if self.resumed.ranges is not None:
            return [], self.resumed.ranges
        return calibration_units(self.plan.units, cfg.calibration_rows), None

    def fp8_sample(self, cfg: JobConfig) -> list:
        """--dtype fp8: the units and rows every encoder rank's fidelity check embeds (launch/build.py)."""
        if cfg.dtype != "fp8" or not self.kind.has_encoders:
            return []
        return calibration_units(self.plan.units, cfg.fp8_check_rows)

    def dedup(self, cfg: JobConfig, roles: RoleMap) -> tuple[bool, str]:
        """(whether this job deduplicates, why not where it does not). --dedup auto is on only with --reuse; where
        deduplication cannot run, --dedup on and --reuse are errors."""
        why = ""
        if cfg.dedup == "off":
            return False, "--dedup off"
        if not self.kind.has_encoders:
            return False, "not an embedding job"
        if cfg.dedup == "auto" and not cfg.reuse:
            return False, "off unless asked for (--dedup on) or needed (--reuse)"
        if self.digest_of != "text":
            why = ("rows are windows of chunked texts (--chunk-tokens)" if cfg.chunk_tokens else
                   "the input includes a token directory, whose rows are digested by their token ids")
        elif len(roles.encoders) > MAX_DEDUP_OWNERS:
            why = (f"{len(roles.encoders)} encoder ranks: every tokenizer rank links to every encoder rank, which "
                   f"this release allows up to {MAX_DEDUP_OWNERS}")
        if why and (cfg.dedup == "on" or cfg.reuse):
            raise ConfigError(f"--{'reuse' if cfg.reuse else 'dedup on'} cannot run: {why}")
        return not why, why

    def committed_shards(self) -> list[tuple[int, str, int]]:
        """(unit, path, position) of every shard earlier runs committed, positions ordering their rows, for the
        kinds whose tokenizers check new ids against them."""
        if not self.kind.checks_committed_ids:
            return []
        names = sorted((u.unit, name) for u in self.resumed.units.values() for name in u.shards)
        return [(unit, self.output.file(name), k << 32) for k, (unit, name) in enumerate(names)]


@dataclass
class RunPlan:
    """What the conductor broadcasts to every rank once it has planned the job: go (with the role map, the model
    and the data path), nothing to do, or a user error that ends the job on every rank."""
    status: str                                 # 'run', 'complete' or 'error'
    roles: RoleMap | None = None
    spec: ModelSpec | None = None
    committed_shards: list[tuple[int, str, int]] = field(default_factory=list)
    data_path: str = "mpi"                      # how token batches travel: 'mpi' or 'ucx'
    batch_tokens: int = 0                       # the encoder ranks' token budget, which tokenizers cut batches to
    # int8/uint8 output: the rows encoder ranks calibrate on, or the ranges an earlier run of the job recorded.
    calibration: list = field(default_factory=list)
    ranges: list | None = None
    digest_seed: int | None = None              # tokenizers digest each row with it (io/digest.py)
    dedup: bool = False                         # rows are claimed from their digests' owners (roles/dedup.py)
    reuse: list = field(default_factory=list)   # --reuse: earlier outputs' shards to load (io/reuse.py)
    fp8_sample: list = field(default_factory=list)  # --dtype fp8: the rows the fidelity check embeds
    error: str = ""
    exit_code: int = 0


# What shapes an embedding besides its token ids: the row digests' seed is made of these fingerprint entries,
# and of max_seq_length where rows are digested by their text.
RESULT_KEYS = ("model_id", "pooling", "normalize", "dtype", "prompt", "prompt_tokens_pooled", "dimensions")
# Encoder ranks a deduplicating job may have: each links to every tokenizer rank (bench/notes/dedup.md).
MAX_DEDUP_OWNERS = 64


def resolved_dtype(cfg: JobConfig, device: str, spec: ModelSpec) -> str:
    if cfg.rehearse:        # no model runs: the dtype (part of the result's identity) says so
        return "rehearsal"
    return cfg.dtype if cfg.dtype != "auto" else default_dtype(spec, device)


def model_spec(cfg: JobConfig, embedding: bool = True) -> ModelSpec:
    """The model as the job's options describe it (the conductor's, and an encoder rank's that builds early);
    `embedding`: with the job's prompt and --dimensions (a tokenize job takes neither)."""
    spec = ModelSpec.load(cfg.model or default_model_dir(), pooling=cfg.pooling, normalize=cfg.normalize,
                          max_seq_length=cfg.max_seq_length)
    return spec.with_options(cfg.prompt_name, cfg.prompt, cfg.dimensions, _prompt_tokens(spec)) if embedding else spec


def _prompt_tokens(spec: ModelSpec):
    """A prompt's tokens as sentence-transformers counts them: special tokens included, but not a trailing one."""
    def count(prompt: str) -> int:
        from ..tokenize.hf import load_tokenizer
        tokenizer = load_tokenizer(spec.path)
        tokenizer.no_padding()          # tokenizer.json may pad (the bundled one pads to 128)
        tokenizer.no_truncation()
        encoding = tokenizer.encode(prompt.lower() if spec.lowercase else prompt)
        return len(encoding.ids) - (1 if encoding.special_tokens_mask and encoding.special_tokens_mask[-1] else 0)
    return count


def prepare(cfg: JobConfig, kind: JobKind, device: str) -> JobSetup:
    """Load the model's description, plan the units, open the output directory. Raises HpcEmbedError for the
    user."""
    started = time.time()
    spec = model_spec(cfg, kind.has_encoders)
    tokenizer = tokenizer_identity(HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase),
                                   spec.name)
    kind.check_inputs(cfg, spec, tokenizer)
    kind.check_model(cfg, spec)
    files = resolve_inputs(cfg.input)
    check_output_outside_inputs(cfg.output, files, cfg.input)
    plan = plan_job(files, cfg.unit_rows, skip_unreadable=cfg.on_invalid == "skip")
    dtype = resolved_dtype(cfg, device, spec)
    output = OutputDir(cfg.output, tokens=kind.tokens_out)
    fingerprint = kind.fingerprint(cfg, spec, plan, dtype, tokenizer)
    of = digest_of(cfg, plan)
    identity = digest_identity(fingerprint, of, RESULT_KEYS)
    seed = digest_seed(identity) if kind.has_encoders else None
    # Before the output is opened: a refused --reuse leaves it as it was, even under --overwrite.
    reuse = _plan_reuse(cfg, output, identity, seed) if kind.has_encoders else []
    status, resumed = output.open(fingerprint, [e.as_reject() for e in plan.unreadable], cfg.overwrite)
    for unit, cut in resumed.splits:        # tail stealing's splits of the earlier runs (protocol/stealing.py)
        plan.split(unit, cut)
    log.info("%d input files, %s rows in %d work units; %s", len(files), f"{plan.total_rows:,}", len(plan.units),
             kind.describe(spec, tokenizer))
    if status == "resume":
        log.info("resuming %s: %d of %d units (%s output rows) already committed", output.location,
                 len(resumed.units), len(plan.units), f"{resumed.rows:,}")
    return JobSetup(kind, spec, plan, output, started, status, resumed, dtype, tokenizer, seed, of, identity, reuse)


def _plan_reuse(cfg: JobConfig, output: OutputDir, identity: dict, seed: int) -> list:
    if not cfg.reuse:
        return []
    if cfg.dedup == "off":
        raise ConfigError("--reuse finds rows through deduplication's digest tables: drop --dedup off")
    from ..io.reuse import plan_reuse
    shards = plan_reuse(cfg.reuse, output, identity, seed, RESULT_KEYS)
    log.info("--reuse: %d shards, %s rows from %d earlier outputs", len(shards), f"{sum(s.rows for s in shards):,}",
             len(cfg.reuse))
    return shards


def already_complete(setup: JobSetup) -> dict:
    log.info("%s already holds the complete output of this job (_SUCCESS); nothing to do", setup.output.location)
    manifest = setup.output.read_manifest()
    manifest["already_complete"] = True
    return manifest


def finish(cfg: JobConfig, setup: JobSetup, result: JobResult, ranks: list[dict], transport: str,
           device: str, dedup: tuple[bool, str] = (False, "")) -> dict:
    """Write the manifest, then _SUCCESS if every row is accounted for. `dedup`: JobSetup.dedup's answer."""
    ignored = [r["reuse_shards_ignored"] for r in ranks if r.get("reuse_shards_ignored") is not None]
    dedup = {"on": dedup[0], **({"why_off": dedup[1]} if not dedup[0] else {}),
             **({"memory_gib": cfg.dedup_memory} if dedup[0] else {}),
             **({"reuse": list(cfg.reuse), "reuse_shards_ignored": max(ignored, default=0)} if cfg.reuse else {})}
    manifest = build_manifest(
        started=setup.started, what=setup.kind.manifest_section(setup.spec, setup.dtype, device, setup.tokenizer),
        config={"text_column": cfg.text_column, "id_column": cfg.id_column or None, "on_invalid": cfg.on_invalid,
                **({"output_dtype": cfg.output_dtype, "output_format": cfg.output_format, **chunking(cfg),
                    "row_digest": {"algorithm": "xxh3-128", "seed": setup.digest_seed, "of": setup.digest_of},
                    "dedup": dedup}
                   if setup.kind.has_encoders else {})},
        settings={"unit_rows": cfg.unit_rows, "chunk_rows": cfg.chunk_rows, "steal_rows": cfg.steal_rows,
                  "credits": cfg.credits, "window_batches": cfg.window_batches,
                  "instances_per_gpu": cfg.instances_per_gpu,
                  "max_batch_tokens": cfg.max_batch_tokens or None,
                  # What tokenizer batches were cut to (scaling/sim.py replays a run with it).
                  "tokenizer_batch_tokens": cfg.batch_tokens_for(device) if setup.kind.has_encoders else 0,
                  "read_ahead_batches": READ_AHEAD_BATCHES},
        plan=setup.plan, result=result, ranks=ranks, transport=transport)
    if cfg.rehearse:
        from ..rehearsal import parse_rates
        tokenizer_rate, encoder_rate = parse_rates(cfg.rehearse)
        manifest["rehearsal"] = {"tokenizer_tokens_per_s": tokenizer_rate, "encoder_tokens_per_s": encoder_rate,
                                 "embeddings": "zeros: a rehearsal of the control plane, not an embedding job"}
    setup.output.write_manifest(manifest)
    if manifest["complete"] and not cfg.rehearse:
        setup.output.write_success()
    return manifest
