"""Decisions the MPI launcher makes on rank 0 before work starts: the transport to open, the device kind of the
encoder ranks, the role map (with the rate plan that trims tokenizer ranks to what the encoders need), and whether
token batches travel over UCX or MPI."""
from __future__ import annotations

import logging
import os
import threading

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


def plan_job_roles(cfg: JobConfig, kind: JobKind, setup, ranks: list[RankInfo],
                   probe: "EarlyRateProbe | None" = None) -> RoleMap:
    hosts = {r.rank: r.host for r in ranks}
    if not kind.has_encoders:
        roles = RoleMap(conductor=0, tokenizers=list(range(1, len(ranks))), encoders=[], hosts=hosts)
    else:
        roles = _plan_by_rates(cfg, setup, plan_roles(ranks, cfg.tokenizer_ranks or None), ranks, probe)
    _advise_unit_rows(cfg, setup, len(roles.tokenizers))
    return assign_subconductors(roles, ranks, cfg.sub_conductors, cfg.commit_fanin)


def _advise_unit_rows(cfg: JobConfig, setup, tokenizer_ranks: int) -> None:
    """A job with fewer units than tokenizer ranks starts most ranks waiting for tail stealing to split a unit, and
    the pieces are of unequal size: say which --unit-rows gives each rank a unit of its own. Not on a resume (other
    units make another job), nor where each rank's share is less than a split keeps (--steal-rows)."""
    units, per_rank = len(setup.plan.units), setup.plan.total_rows // max(tokenizer_ranks, 1)
    if setup.status != "resume" and units < tokenizer_ranks and per_rank >= max(cfg.steal_rows, 1):
        log.warning("%d work unit(s) for %d tokenizer ranks: most ranks start by waiting for a unit to be split. "
                    "--unit-rows %d (now %d) gives each rank a unit of its own (Parquet input is cut at row groups, "
                    "so its units are no smaller than one)", units, tokenizer_ranks, per_rank, cfg.unit_rows)


def _plan_by_rates(cfg: JobConfig, setup, roles: RoleMap, ranks: list[RankInfo],
                   probe: "EarlyRateProbe | None") -> RoleMap:
    """On CUDA (or when --gpu-tokens-per-s states the encoder's rate), keep only the tokenizer ranks the encoder
    ranks need at measured rates; --tokenizer-ranks fixes the split instead. Token-directory input is only
    read, not tokenized, so every tokenizer rank is kept."""
    if cfg.tokenizer_ranks or not (cfg.gpu_tokens_per_s or job_device(cfg, ranks).startswith("cuda")):
        return roles
    units = [u for u in setup.plan.units if u.file.format != "tokens"]
    if not units:
        return roles
    found = probe.result() if probe is not None else None
    rate, backend_name = found if found is not None else probe_tokenizer_rate(cfg, setup.spec, units[0])
    planned, plan = plan_tokenizers(roles, ranks, rate / PROBE_OVER_LOADED, cfg.gpu_tokens_per_s, rate)
    log.info("%s (%s backend)", plan.describe(), backend_name)
    return planned


def probe_tokenizer_rate(cfg: JobConfig, spec, unit) -> tuple[float, str]:
    """Tokens per second of one core tokenizing the first texts of `unit` as the tokenizer ranks will (chunks too),
    and the backend's name."""
    from ..world import measure_tokenizer_rate
    texts: list[str] = []
    try:
        for chunk in read_unit(unit, Columns(cfg.text_column, cfg.id_column), 1024):
            texts.extend(chunk.texts)
            if len(texts) >= _RATE_SAMPLE_TEXTS:
                break
    except InputError:
        pass            # the unit's tokenizer reports it; plan on what was read, or on a stand-in text
    os.environ.setdefault("RAYON_NUM_THREADS", "1")      # measure what one tokenizer rank (one core) does
    backend = tokenizer_backend(cfg, spec)
    return measure_tokenizer_rate(backend, texts or ["a short text"], seconds=1.0), backend.name


class EarlyRateProbe:
    """Rank 0's tokenizer probe in a thread, started before the GPU census. The census waits seconds for one rank
    to import torch and initialise CUDA; rank 0 then read its input, built the tokenizer and tokenized for a second
    before it could send the plan, which the encoder ranks, once built, waited for (0.7 s on the H200 box;
    bench/notes/feed_the_gpu.md, call 15). Started only where the rate plan will want it (a GPU on this machine,
    or --gpu-tokens-per-s); anything that goes wrong here leaves the plan to measure as before.
    HPCEMBED_EARLY_PROBE=0 leaves the probe to the plan, for measuring the difference (bench/startup.py)."""

    def __init__(self, cfg: JobConfig, kind: JobKind):
        self._found: tuple[float, str] | None = None
        self._thread: threading.Thread | None = None
        wanted = cfg.gpu_tokens_per_s or cfg.device.startswith("cuda") or (
            cfg.device == "auto" and os.path.isdir("/proc/driver/nvidia/gpus"))
        if (kind.has_encoders and wanted and not (cfg.tokenizer_ranks or cfg.rehearse)
                and os.environ.get("HPCEMBED_EARLY_PROBE", "1") != "0"):
            self._thread = threading.Thread(target=self._run, args=(cfg,), name="rate-probe", daemon=True)
            self._thread.start()

    def _run(self, cfg: JobConfig) -> None:
        from ..io.sources import plan_job, resolve_inputs
        from .setup import model_spec
        try:
            first = plan_job(resolve_inputs(cfg.input)[:1], cfg.unit_rows, skip_unreadable=True).units
            if first and first[0].file.format != "tokens":
                self._found = probe_tokenizer_rate(cfg, model_spec(cfg), first[0])
        except Exception as exc:     # noqa: BLE001 - the plan measures again, and reports what is wrong
            log.debug("early tokenizer probe: %s", exc)

    def result(self, timeout: float = 60.0) -> tuple[float, str] | None:
        if self._thread is None:
            return None
        self._thread.join(timeout)
        return self._found
