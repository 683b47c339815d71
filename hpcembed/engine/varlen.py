"""The padding-free encoder, the GPU fast path: for the BERT family, and for LLM decoders (engine/decoder.py).

A batch is its real tokens only: flat ids [T] with cumulative sequence offsets, as a TokenBatch already holds
them, so no pad token is ever embedded, multiplied or attended. Q, K and V come from one fused projection, and
attention is varlen flash attention over the offsets. Pooling and normalization run on the GPU, so what comes
back per batch is [rows, dim].

Feeding: the host packs ids and sequence offsets into one pinned int32 buffer and copies it with a single
asynchronous H2D copy on this instance's own stream; each token's row and position are derived on the GPU from
the offsets. The pooled result comes back by one asynchronous D2H copy into pinned memory. `launch` queues all of
that and returns; the instance thread launches the next batch behind it before it waits for the first one's
result, so the stream does not run dry while the thread comes back (engine/instances.py).

CUDA graphs: with graph_tokens set, the forward is captured once per (token, row) bucket at start-up, and a
batch is padded up to its bucket and replayed as one graph launch instead of ~80 kernel launches from Python.
Padding tokens sit after the last sequence offset, so attention never reads them, and they pool into a spare
row that is dropped; padding rows are empty sequences. Batches that fit no bucket (or hold a text longer than
GRAPH_MAX_LEN) run eagerly.

On CPU (tests, CI) the same math runs with padded SDPA in place of the varlen kernel, so everything but the
attention kernel is checked against transformers without a GPU.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..tokenize.batch import TokenBatch
from . import decoder, gemma
from .base import Encoder, Pending, torch_dtype
from .dense import DenseStack
from .bert import BertWeights, encoder_forward, supports as bert_supports
from .model import ModelSpec
from .attention_kernels import attention_kernel


def supports(spec: ModelSpec) -> str | None:
    """None when the padding-free path serves this model (the BERT family or a decoder), else why not."""
    if not spec.is_decoder:
        return bert_supports(spec)
    why = decoder.supports(spec)
    return gemma.supports(decoder.config_of(spec)) if why is None and spec.model_type in gemma.TYPES else why


def decoder_weights(spec: ModelSpec) -> type:
    """The weights class of a decoder's family: Gemma 3's (engine/gemma.py), or the Llama family's."""
    return gemma.GemmaWeights if spec.model_type in gemma.TYPES else decoder.DecoderWeights


def add_layer_norm(x, residual, weight, bias, eps: float):
    return F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)


def embed(word, position, type_row, ids, positions, weight, bias, eps: float):
    x = word[ids] + position[positions] + type_row
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def mean_pool(states: torch.Tensor, seg: torch.Tensor, cu: torch.Tensor, skip: int = 0,
              within: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's mean token state as float32 [rows, hidden], leaving out its first `skip` tokens (a prompt the
    model's pooling excludes), by `within`, each token's place in its row; `seg` maps tokens to rows."""
    lengths = cu[1:] - cu[:-1]
    if skip:
        states = states * (within >= skip)[:, None].to(states.dtype)
        lengths = lengths - skip
    inv_lengths = 1.0 / lengths.clamp(min=1).to(torch.float32)
    sums = torch.zeros(inv_lengths.shape[0], states.shape[1], device=states.device, dtype=torch.float32)
    return sums.index_add_(0, seg, states.float()) * inv_lengths[:, None]


class _Ops:
    """The memory-bound pieces between matmuls, eager: each is several kernels (the CPU path). `fused_ops` swaps
    in one kernel each: hpcembed's Triton kernels, or torch.compile's (see VarlenEncoder)."""
    add_layer_norm = staticmethod(add_layer_norm)
    embed = staticmethod(embed)
    mean_pool = staticmethod(mean_pool)


def pool_varlen(states: torch.Tensor, seg: torch.Tensor, cu: torch.Tensor, rows: int, mode: str,
                ops=None, skip: int = 0, within: torch.Tensor | None = None) -> torch.Tensor:
    """[T, hidden] token states -> [rows, hidden] float32, per sentence-transformers' pooling modes. `skip`: mean
    pooling leaves out each row's first `skip` tokens (a prompt the model's pooling excludes), by `within`, each
    token's place in its row."""
    if mode == "cls":
        # Clamped: a bucket's empty padding rows start at the token count when the bucket has no padding tokens.
        return states[cu[:-1].long().clamp(max=states.shape[0] - 1)].float()
    if mode == "lasttoken":
        return states[cu[1:].long() - 1].float()
    if mode == "mean":
        return (ops or _Ops).mean_pool(states, seg, cu, skip, within)
    x = states.float()
    index = seg.long()
    if mode == "max":
        out = torch.full((rows, x.shape[1]), float("-inf"), device=x.device, dtype=torch.float32)
        return out.scatter_reduce_(0, index[:, None].expand_as(x), x, "amax", include_self=True)
    raise ValueError(f"unknown pooling mode {mode!r}")


@functools.cache
def _compiled_ops() -> type[_Ops]:
    """The memory-bound pieces compiled by torch.compile, once per process: every instance shares them, so a second
    instance does not trace and compile them again. Only these pieces: compiling the whole forward took minutes on
    the H100 box and had not finished when the run ended. Not dynamic=True: that makes the hidden size symbolic
    too, and the fused add+LayerNorm then ran at 1 TB/s (592 µs per [262k, 384] call, no faster than eager). The
    default recompiles once with only the token count dynamic, which the first instance's warm-up triggers."""
    class _Compiled(_Ops):
        add_layer_norm = staticmethod(torch.compile(add_layer_norm))
        embed = staticmethod(torch.compile(embed))
        mean_pool = staticmethod(torch.compile(mean_pool))
    return _Compiled


@functools.cache
def _triton_ops() -> type[_Ops]:
    from . import triton_fused

    class _Triton(_Ops):
        add_layer_norm = staticmethod(triton_fused.add_layer_norm)
        embed = staticmethod(triton_fused.embed)
        mean_pool = staticmethod(triton_fused.mean_pool)
    return _Triton


FUSED_OPS = {"eager": lambda: _Ops, "compile": _compiled_ops, "triton": _triton_ops}


def default_fused_ops(cuda: bool) -> str:
    """On CUDA, hpcembed's Triton kernels where Triton imports: as fast as torch.compile's (the stage 4% faster on
    an H200) and no tracing at start-up (bench/notes/gpu_stage.md, feed_the_gpu.md); eager elsewhere."""
    return "triton" if cuda and importlib.util.find_spec("triton") is not None else "eager"


def token_layout(ids: torch.Tensor, cu: torch.Tensor, rows: int, position_offset: int, positions: int):
    """Each token's row and position-embedding index, from the offsets alone (on the GPU: no host work, no sync).
    Tokens past cu[-1] (a bucket's padding) land in the last row, at position 0."""
    index = torch.arange(ids.shape[0], device=ids.device, dtype=torch.int32)
    seg = torch.searchsorted(cu[1:], index, right=True, out_int32=True).clamp_(max=rows - 1)
    within = index - cu[seg.long()]
    within = torch.where(index < cu[-1], within, torch.zeros_like(within)).clamp_(max=positions - 1 - position_offset)
    return seg, within + position_offset


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Graph:
    """One captured forward: a static input (ids then offsets) and a static [rows, dim] output."""

    def __init__(self, tokens: int, rows: int, static_in: torch.Tensor):
        self.tokens, self.rows, self.static_in = tokens, rows, static_in
        self.graph = torch.cuda.CUDAGraph()
        self.static_out: torch.Tensor | None = None


class _InFlight(Pending):
    """A batch queued on an instance's stream: its result is in pinned host memory once `done` has fired."""

    def __init__(self, done: torch.cuda.Event, host: torch.Tensor, staged: torch.Tensor):
        self._done, self._host, self._staged = done, host, staged

    def result(self) -> np.ndarray:
        self._done.synchronize()
        self._staged = None             # its copy to the GPU is done: back to the host allocator's cache
        return self._host.numpy()       # this batch's own buffer: no copy


class VarlenEncoder(Encoder):
    engine = "varlen"
    pads = False
    MIN_GRAPH_ROWS = 64
    TOKEN_BUCKETS = (1.0, 0.75, 0.5, 0.25)   # fractions of graph_tokens that get a graph
    MIN_GRAPH_FILL = 0.125                   # batches below this fraction of graph_tokens run eagerly
    # Flash attention launches one grid row per sequence, and CUDA caps a grid's y dimension at 65535: a batch
    # of more rows (short texts under a large budget) is split. It failed as "invalid argument" on the H100.
    MAX_ROWS = 65535
    # Graphs serve texts of up to this many tokens; longer ones run eagerly. Flash attention's grid grows with the
    # longest text it is told of, so a graph captured at a decoder's 32k would launch ~64x the blocks of one at 512.
    GRAPH_MAX_LEN = 2048

    # A server's low-latency instance (`weights_of`): every batch it gets is small, so each goes through a graph,
    # the smallest bucket an eighth of graph_tokens.
    LOW_LATENCY_BUCKETS = (1.0, 0.5, 0.25, 0.125)

    def __init__(self, spec: ModelSpec, device: str = "cuda", dtype: str = "fp16", fused_ops: str = "eager",
                 gelu_epilogue: bool = False, graph_tokens: int = 0, attention: str = "auto",
                 weights_of: "VarlenEncoder | None" = None):
        """`attention` (CUDA): 'flash', torch's varlen flash attention, 'triton' (engine/triton_attention.py), or
        'auto' (attention_kernels.py). `fused_ops`: how the pieces between matmuls run, 'eager', 'triton'
        (engine/triton_fused.py; on CPU tensors only in Triton's interpreter) or 'compile' (torch.compile), or
        'auto' (default_fused_ops).
        `weights_of`: an instance for a server's low-latency lane beside that one: it shares its weights (no second
        copy), runs on a stream of the highest priority, so that its kernels take the GPU's free slots before
        those of bulk batches already queued on the other instances' streams, and replays a graph for every batch
        of up to graph_tokens tokens."""
        why = supports(spec)
        if why:
            raise ConfigError(f"the padding-free encoder does not serve this model: {why}")
        self.spec, self.device_name, self.dtype_name = spec, device, dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.decoder = spec.is_decoder
        if dtype == "fp8" and not self.decoder:
            raise ConfigError("--dtype fp8 is for decoder (LLM-based) models; at BERT sizes its matmuls gain "
                              "little (engine/fp8.py); use fp16 or bf16")
        started = time.perf_counter()
        self.low_latency = weights_of is not None
        self.token_buckets = self.LOW_LATENCY_BUCKETS if self.low_latency else self.TOKEN_BUCKETS
        self.min_graph_fill = 0.0 if self.low_latency else self.MIN_GRAPH_FILL
        if weights_of is not None:
            self.weights = weights_of.weights
        elif self.decoder:
            from .fp8 import Fp8Linear
            self.weights = decoder_weights(spec)(spec.path, torch_dtype("bf16" if dtype == "fp8" else dtype),
                                                 self.device, Fp8Linear if dtype == "fp8" else decoder.Linear)
        else:
            self.weights = BertWeights(spec.path, torch_dtype(dtype), self.device)
        self.dense = (weights_of.dense if weights_of is not None else DenseStack(spec, self.device)) if spec.dense \
            else None
        self.build_seconds = {"weights": time.perf_counter() - started}
        self.attention_name, self.attention = attention_kernel(self.weights, self.decoder, self.cuda, attention)
        self.graph_max_len = min(spec.max_seq_length, self.GRAPH_MAX_LEN)
        if fused_ops == "auto":
            fused_ops = default_fused_ops(self.cuda)
        if fused_ops not in FUSED_OPS:
            raise ConfigError(f"fused ops {fused_ops!r}: expected one of {', '.join(FUSED_OPS)} or auto")
        if fused_ops == "triton" and (importlib.util.find_spec("triton") is None or
                                      not self.cuda and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ConfigError("--fused-ops triton needs Triton and a CUDA device (on CPU only Triton's interpreter "
                              "runs it, TRITON_INTERPRET=1); use --fused-ops eager")
        self.fused_ops = fused_ops
        self.ops = FUSED_OPS[fused_ops]()
        self.decoder_ops = self.weights.ops_for(fused_ops) if self.decoder else None
        self.gelu_epilogue = gelu_epilogue and self.weights.config.get("hidden_act", "gelu").startswith("gelu")
        # CUDA numbers priorities downwards, and torch maps one beyond the device's range to the nearest valid
        # one: -100 is the highest there is.
        priority = -100 if self.low_latency else 0
        self.stream = torch.cuda.Stream(self.device, priority=priority) if self.cuda else None
        self.launch_ahead = 2 if self.cuda else 1
        # (tokens, rows) bucket -> captured graph; on CPU the buckets are kept (padded layout, run eagerly), so
        # tests check the padding against transformers without a GPU.
        self.graph_tokens = graph_tokens
        self.graphs: dict[tuple[int, int], _Graph | None] = {}
        self.graph_batches = 0                 # batches served by a graph replay
        if fused_ops == "compile" or self.cuda:
            # Compile and warm up now, on the constructing thread, not in the first batches of two instance
            # threads at once. Two batches of different token counts, so torch.compile's token dimension turns
            # dynamic.
            for lengths in ((5, 9), (7, 12, 3)):
                self.encode(TokenBatch.build([[1] * n for n in lengths], [str(n) for n in lengths],
                                             np.arange(len(lengths)), 0))
        self.build_seconds["compile"] = time.perf_counter() - started - self.build_seconds["weights"]
        if graph_tokens:
            self._capture_all()
        self.build_seconds["graphs"] = time.perf_counter() - started - sum(self.build_seconds.values())

    # -- buckets and graphs --------------------------------------------------------------------------------------

    def bucket(self, tokens: int, rows: int, longest: int) -> tuple[int, int] | None:
        """The (tokens, rows) bucket a batch is padded to, or None to run it as it is."""
        if (not self.graph_tokens or longest > self.graph_max_len
                or tokens < self.graph_tokens * self.min_graph_fill):
            return None
        fits = [int(self.graph_tokens * f) for f in self.token_buckets if int(self.graph_tokens * f) >= tokens]
        if not fits:
            return None
        t_b = min(fits)
        r_b = max(self.MIN_GRAPH_ROWS, _power_of_two_at_least(rows + 1))    # +1: the padding tokens' row
        return (t_b, r_b) if r_b <= self._max_graph_rows(t_b) else None

    def _max_graph_rows(self, t_b: int) -> int:
        return min(t_b // 8, _power_of_two_at_least(self.MAX_ROWS + 1) // 2)

    def _capture_all(self) -> None:
        """Capture every bucket now: capturing mid-run would stall this instance and contend with the other."""
        buckets = []
        for f in self.token_buckets:
            t_b = int(self.graph_tokens * f)
            r_b = self.MIN_GRAPH_ROWS
            while r_b <= self._max_graph_rows(t_b):
                buckets.append((t_b, r_b))
                r_b *= 2
        if not self.cuda:
            self.graphs = {b: None for b in buckets}
            return
        pool = torch.cuda.graph_pool_handle()     # one pool: an instance replays one graph at a time
        warmed: set[int] = set()
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            for t_b, r_b in buckets:
                static_in = torch.zeros(t_b + r_b + 1, dtype=torch.int32, device=self.device)
                g = _Graph(t_b, r_b, static_in)
                # All-zero offsets: every row empty, a valid input. Warm up first, so any recompilation and
                # cuBLAS workspace allocation happens outside the capture: once per token count, which is what
                # the matmuls' shapes depend on (the row count only sizes the attention grid and the pooling).
                if t_b not in warmed:
                    warmed.add(t_b)
                    self._run(static_in, t_b, r_b, self.graph_max_len)
                    self.stream.synchronize()
                with torch.cuda.graph(g.graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
                    g.static_out = self._run(static_in, t_b, r_b, self.graph_max_len)
                self.graphs[(t_b, r_b)] = g
        self.stream.synchronize()

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, batch: TokenBatch) -> np.ndarray:
        return self.launch(batch).result()

    def launch(self, batch: TokenBatch) -> Pending:
        if batch.num_rows > self.MAX_ROWS:
            half = batch.num_rows // 2
            return Pending(np.concatenate([self.encode(batch.take(np.arange(half))),
                                           self.encode(batch.take(np.arange(half, batch.num_rows)))]))
        return self._launch(batch)

    @torch.inference_mode()
    def _launch(self, batch: TokenBatch) -> Pending:
        rows, total = batch.num_rows, batch.num_tokens
        lengths = batch.lengths
        longest = int(lengths.max())
        key = self.bucket(total, rows, longest)
        t_b, r_b = key if key else (total, rows)
        # Each batch stages in its own pinned buffers, from torch's caching host allocator (cheap after the first
        # batches); they live until its result is taken, so a batch launched behind it cannot overwrite them.
        staged = torch.empty(t_b + r_b + 1, dtype=torch.int32, pin_memory=self.cuda)
        packed = staged.numpy()
        packed[:total] = batch.token_ids[batch.offsets[0]: batch.offsets[-1]]
        packed[total: t_b] = 0
        cu = packed[t_b: t_b + r_b + 1]
        cu[0] = 0
        np.cumsum(lengths, out=cu[1: rows + 1])
        cu[rows + 1:] = total                       # padding rows: empty sequences
        if not self.cuda:
            return Pending(self._run(staged, t_b, r_b, self.graph_max_len if key else longest)[:rows].numpy())
        graph = self.graphs.get(key) if key else None
        with torch.cuda.stream(self.stream):
            if graph is not None:
                graph.static_in.copy_(staged, non_blocking=True)
                graph.graph.replay()
                self.graph_batches += 1
                out = graph.static_out
            else:
                out = self._run(staged.to(self.device, non_blocking=True), t_b, r_b,
                                self.graph_max_len if key else longest)
            host = torch.empty((rows, out.shape[1]), dtype=torch.float32, pin_memory=True)
            host.copy_(out[:rows], non_blocking=True)
            # A spinning wait (the default event), though it holds a core: waiting asleep (blocking=True) made the
            # node 20-25% slower on the H200 box, even with the next batch launched behind this one
            # (bench/notes/feed_the_gpu.md).
            done = torch.cuda.Event()
            done.record(self.stream)
        return _InFlight(done, host, staged)

    def _run(self, dev: torch.Tensor, total: int, rows: int, max_len: int) -> torch.Tensor:
        ids, cu = dev[:total], dev[total: total + rows + 1]
        w = self.weights
        seg, positions = token_layout(ids, cu, rows, w.position_offset, w.max_positions)
        if self.decoder:
            states = w.forward(ids, positions, cu, max_len, self.attention, self.decoder_ops)
        else:
            states = encoder_forward(w, ids, positions, cu, max_len, self.attention, self.gelu_epilogue, self.ops)
        skip = self.spec.pool_skip
        out = pool_varlen(states, seg, cu, rows, self.spec.pooling, self.ops, skip,
                          positions - w.position_offset if skip else None)
        if self.dense is not None:
            out = self.dense(out)
        if self.spec.truncate_dim:
            out = out[:, : self.spec.truncate_dim]
        return F.normalize(out, p=2, dim=1) if self.spec.normalize else out
