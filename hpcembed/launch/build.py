"""Building a rank's role from the job's config: its protocol core and its real-time driver. Both launchers build
ranks here, so a role is the same whether it runs as a thread or as an MPI rank."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..cache import cache_dir, use_cache_dir
from ..config import JobConfig
from ..engine import ModelSpec
from ..engine.instances import InstancePool
from ..errors import ConfigError
from ..io.readers import Columns
from ..io.writer import OutputDir
from ..protocol.encoder import EncoderCore
from ..protocol.tokenizer import TokenizerCore
from ..roles.dedup import Claims, DigestTable
from ..roles.encoder import EncoderRank
from ..roles.tokenizer import TokenizerRank
from ..tokenize import Prompted, make_tokenizer
from ..tokenize.chunk import Chunker
from ..topology import RoleMap
from ..transport.base import Transport
from .kinds import JobKind

log = logging.getLogger("hpcembed")

if TYPE_CHECKING:
    from ..engine.base import Encoder


def tokenizer_backend(cfg: JobConfig, spec: ModelSpec, chunking: bool = True):
    """What tokenizes the job's texts: the backend --tokenizer-backend names, or under --chunk-tokens HF in
    windows (tokenize/chunk.py)."""
    if cfg.rehearse:
        from ..rehearsal import StandInTokenizer, parse_rates
        return StandInTokenizer(spec.max_seq_length, parse_rates(cfg.rehearse)[0])
    if cfg.chunk_tokens and chunking:
        return Chunker.for_model(spec.path, cfg.chunk_tokens, cfg.chunk_overlap, spec.lowercase)
    backend = make_tokenizer(spec.path, spec.max_seq_length, spec.lowercase, cfg.tokenizer_backend,
                             cache_dir(cfg.cache_dir))
    return Prompted(backend, spec.prompt) if spec.prompt else backend


def tokenizer_rank(cfg: JobConfig, kind: JobKind, transport: Transport, roles: RoleMap, spec: ModelSpec,
                   committed_shards: list[tuple[int, str, int]], batch_tokens: int, peers=None,
                   digest_seed: int | None = None, dedup: bool = False) -> TokenizerRank:
    """`batch_tokens`: the encoder ranks' token budget, which batches are cut to (0 for a tokenize job);
    `digest_seed`: each row is digested with it (an embedding job's, io/digest.py); `dedup`: rows are claimed
    from the encoder ranks that own their digests (roles/dedup.py)."""
    backend = tokenizer_backend(cfg, spec, chunking=kind.has_encoders)
    # Each tokenizer checks its share of the shards earlier runs committed against the new rows.
    index = roles.tokenizers.index(transport.rank)
    share = committed_shards[index:: len(roles.tokenizers)]
    return TokenizerRank(transport, TokenizerCore(transport.rank, roles, cfg.steal_rows), backend,
                         _columns(cfg, spec),
                         cfg.chunk_rows, cfg.on_invalid == "skip",
                         kind.sink(cfg.output), peers, share,
                         batch_tokens if kind.has_encoders else 0, digest_seed,
                         Claims(roles.encoders) if dedup else None)


def build_encoders(cfg: JobConfig, spec: ModelSpec, device: str, low_latency: tuple[int, int] = (0, 0)
                   ) -> list[Encoder]:
    """An encoder rank's model instances, built (weights loaded, kernels compiled, CUDA graphs captured).
    `low_latency` (a server's): (count, tokens): on CUDA with the padding-free engine, that many more instances
    after the others, for batches of up to `tokens` tokens, sharing the first one's weights (VarlenEncoder's
    weights_of)."""
    if cfg.rehearse:
        from ..rehearsal import StandInEncoder, parse_rates
        return [StandInEncoder(spec, parse_rates(cfg.rehearse)[1])]
    from ..engine.build import build_encoder, resolve_device      # torch: encoder ranks only
    device = resolve_device(device)
    if device.startswith("cuda"):
        use_cache_dir(cfg.cache_dir)
    graph_tokens = cfg.batch_tokens_for(device) if cfg.cuda_graphs is not False else 0
    def build():
        return build_encoder(spec, device, cfg.dtype, cfg.engine, cfg.fused_ops, cfg.exact_gelu, graph_tokens,
                             cfg.attention)
    first = build()
    # On CPU a second instance would only split the same cores between two copies of the weights.
    count = cfg.instances_per_gpu or (1 if spec.is_decoder else 2)
    cuda = first.device_name.startswith("cuda")
    encoders = [first] + [build() for _ in range((count if cuda else 1) - 1)]
    if cuda and first.engine == "varlen":
        from ..engine.varlen import VarlenEncoder
        encoders += [VarlenEncoder(spec, first.device_name, first.dtype_name, first.fused_ops, first.gelu_epilogue,
                                   low_latency[1] if graph_tokens else 0, first.attention_name, weights_of=first)
                     for _ in range(low_latency[0])]
    return encoders


def calibrate_for(cfg: JobConfig, spec: ModelSpec, units: list, encoder: Encoder):
    """int8/uint8 calibration ranges [2, dim] from `units` (launch/calibrate.py), tokenized as this job tokenizes."""
    from .calibrate import calibrate
    return calibrate(units, _columns(cfg, spec), tokenizer_backend(cfg, spec), encoder,
                     cfg.batch_tokens_for(encoder.device_name), cfg.chunk_pooling == "mean", spec.normalize)


def check_fp8(cfg: JobConfig, spec: ModelSpec, units: list, encoders: list[Encoder]) -> float:
    """--dtype fp8's fidelity check (engine/fp8.py) on `units`' rows of the job's own input, by the first encoder;
    then every encoder's bf16 weights are dropped. Raises ConfigError (the job ends, exit 2, nothing written) when
    the minimum cosine is below --fp8-min-cosine."""
    from ..engine.fp8 import drop_references, fidelity
    from .calibrate import sample_batches
    batches = sample_batches(units, _columns(cfg, spec), tokenizer_backend(cfg, spec),
                             cfg.batch_tokens_for(encoders[0].device_name), "check FP8 fidelity")
    cosine = fidelity(encoders[0], batches)
    drop_references(encoders)
    rows = sum(b.num_rows for b in batches)
    log.info("--dtype fp8: minimum cosine against bf16 %.6f on %d rows of the input", cosine, rows)
    if cosine < cfg.fp8_min_cosine:
        raise ConfigError(f"--dtype fp8 is not faithful enough for this model and input: on {rows} rows of the "
                          f"job's own texts the minimum cosine between FP8 and bf16 embeddings is {cosine:.6f}, "
                          f"below --fp8-min-cosine {cfg.fp8_min_cosine}; run with --dtype bf16, or lower the bound")
    for encoder in encoders:
        encoder.fp8_min_cosine = cosine
    return cosine


def _columns(cfg: JobConfig, spec: ModelSpec) -> Columns:
    return Columns(cfg.text_column, cfg.id_column, (spec.max_seq_length, spec.vocab_size) if spec.vocab_size else None)


def encoder_rank(cfg: JobConfig, transport: Transport, roles: RoleMap, encoders: list[Encoder], spec: ModelSpec,
                 startup: dict[str, float] | None = None, ranges=None, dedup: bool = False,
                 reuse: list = ()) -> EncoderRank:
    """`ranges`: int8/uint8 output's calibration ranges (launch/calibrate.py); `dedup`: this rank owns a share
    of the job's digests (roles/dedup.py), and takes its share of `reuse`'s earlier embeddings (io/reuse.py)."""
    core = EncoderCore(transport.rank, roles, cfg.credits, cfg.batch_tokens_for(encoders[0].device_name),
                       cfg.window_batches)
    return EncoderRank(transport, core, InstancePool(encoders),
                       OutputDir(cfg.output, output_dtype=cfg.output_dtype, ranges=ranges,
                                 output_format=cfg.output_format), startup,
                       pool_chunks=cfg.chunk_pooling == "mean", normalize=spec.normalize,
                       dedup=_digest_table(cfg, transport.rank, roles, reuse) if dedup else None)


def _digest_table(cfg: JobConfig, rank: int, roles: RoleMap, reuse: list) -> DigestTable:
    table = DigestTable(int(cfg.dedup_memory * 2**30))
    if reuse:
        from ..io.reuse import load_owned
        table.shards_ignored = load_owned(reuse, table, len(roles.encoders), roles.encoders.index(rank), rank)
    return table
