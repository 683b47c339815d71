"""Decisions the MPI launcher makes on rank 0 before work starts: the transport to open, the device kind of the
encoder ranks, the role map (with the rate plan that trims tokenizer ranks to what the encoders need), and whether
token batches travel over UCX or MPI."""
from __future__ import annotations

import logging
import os

from ..config import JobConfig
from ..errors import ConfigError, InputError
from ..io.readers import Columns, read_unit
from ..topology import RankInfo, RoleMap, assign_subconductors, plan_roles, plan_tokenizers
from ..world import launched_on_one_host
from .build import tokenizer_backend
from .kinds import JobKind

log = logging.getLogger("hpcembed")

_RATE_SAMPLE_TEXTS = 4096


def open_transport(choice: str):
    """The MPI transport, or the UCX one where it may be used. Decided before mpi4py.MPI is first imported,
    because the UCX bindings must load first (see transport/ucx.py). `auto` on one host never uses UCX (see
    choose_data_path), so it skips their import: about 0.7 s of CPU per rank."""
    from ..transport.mpi import MpiTransport
    if choice == "ucx" or (choice != "mpi" and not launched_on_one_host()):
        from ..transport.ucx import UcxTransport, ucx_available
        if ucx_available():
            return UcxTransport()
    return MpiTransport()


def choose_data_path(choice: str, transport, roles: RoleMap) -> str:
    """'ucx' or 'mpi' for the token batches: explicit, or for auto, ucx when any batch crosses a node."""
    if choice == "mpi":
        return "mpi"
    if transport.name != "ucx":
        if choice == "ucx":
            raise ConfigError("--transport ucx: the ucxx bindings do not import here; pip install 'hpcembed[ucx]' "
                              "(the ucxx-cu12 wheel), or use --transport mpi")
        return "mpi"
    crosses = any(roles.host_of(t) != roles.host_of(e) for t in roles.tokenizers for e in roles.encoders_of(t))
    return "ucx" if choice == "ucx" or crosses else "mpi"


def job_device(cfg: JobConfig, ranks: list[RankInfo]) -> str:
    """The device kind of an MPI job's encoder ranks, as the conductor sees it from every rank's GPU count."""
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if any(i.cuda_devices for i in ranks) else "cpu"


# One core measured alone (rank 0's probe, while the other ranks wait) can run faster than each core of a node
# whose every core tokenizes (turbo, shared caches, hyperthread siblings). On the H200 box the probe read up to
# 1.37x what the job's tokenizer ranks then did while busy (1.89M against 1.38M tokens/s), and the plan left 4 of
# 13 cores idle with the GPU 74% busy (bench/notes/feed_the_gpu.md, call 14). Tokenizer ranks beyond what the
# encoders need cost little (they wait for credit), too few cost the GPU: the plan counts on the loaded rate.
PROBE_OVER_LOADED = 1.4


def plan_job_roles(cfg: JobConfig, kind: JobKind, setup, ranks: list[RankInfo]) -> RoleMap:
    hosts = {r.rank: r.host for r in ranks}
    if not kind.has_encoders:
        roles = RoleMap(conductor=0, tokenizers=list(range(1, len(ranks))), encoders=[], hosts=hosts)
    else:
        roles = _plan_by_rates(cfg, setup, plan_roles(ranks, cfg.tokenizer_ranks or None), ranks)
    return assign_subconductors(roles, ranks, cfg.sub_conductors)


def _plan_by_rates(cfg: JobConfig, setup, roles: RoleMap, ranks: list[RankInfo]) -> RoleMap:
    """On CUDA (or when --gpu-tokens-per-s states the encoder's rate), keep only the tokenizer ranks the encoder
    ranks need at measured rates; --tokenizer-ranks fixes the split instead. Token-directory input is only
    read, not tokenized, so every tokenizer rank is kept."""
    from ..world import measure_tokenizer_rate
    if cfg.tokenizer_ranks or not (cfg.gpu_tokens_per_s or job_device(cfg, ranks).startswith("cuda")):
        return roles
    units = [u for u in setup.plan.units if u.file.format != "tokens"]
    if not units:
        return roles
    texts: list[str] = []
    try:
        for chunk in read_unit(units[0], Columns(cfg.text_column, cfg.id_column), 1024):
            texts.extend(chunk.texts)
            if len(texts) >= _RATE_SAMPLE_TEXTS:
                break
    except InputError:
        pass            # the unit's tokenizer reports it; plan on what was read, or on a stand-in text
    os.environ.setdefault("RAYON_NUM_THREADS", "1")      # measure what one tokenizer rank (one core) does
    backend = tokenizer_backend(cfg, setup.spec)           # as the tokenizer ranks will tokenize (chunks too)
    rate = measure_tokenizer_rate(backend, texts or ["a short text"], seconds=1.0)
    planned, plan = plan_tokenizers(roles, ranks, rate / PROBE_OVER_LOADED, cfg.gpu_tokens_per_s, rate)
    log.info("%s (%s backend)", plan.describe(), backend.name)
    return planned
