"""The job configuration: one dataclass, loaded from a TOML job file and overridden by command-line options.

Every option's default and help text is declared here once; the CLI is generated from these fields.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _opt(default: Any, help: str, choices: tuple | None = None, **extra: Any) -> Any:
    meta = {"help": help, "choices": choices, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class JobConfig:
    input: list[str] = _opt([], "input files, directories or globs (Parquet, .jsonl, .jsonl.gz, .csv, .txt), or URLs "
                                "such as s3://bucket/prefix/ (endpoint: AWS_ENDPOINT_URL)", nargs="+")
    output: str = _opt("", "output directory for Parquet shards, _manifest.json and _SUCCESS (or an object-store "
                            "prefix, s3://bucket/prefix)")
    model: str = _opt("", "sentence-transformers or Hugging Face model directory (default: bundled all-MiniLM-L6-v2)")
    text_column: str = _opt("text", "column (Parquet/CSV) or key (JSONL) holding the text")
    id_column: str = _opt("", "column holding row ids (default: 'id' if present, else '<file>:<row>', the file's "
                               "path within its input without extension)")
    on_invalid: str = _opt("fail", "invalid rows: 'fail' stops the job, 'skip' records them in OUTPUT/_rejects.jsonl",
                           choices=("fail", "skip"))
    overwrite: bool = _opt(False, "replace the output of an earlier job in --output")
    input_fingerprint: str = _opt("stat", "how a rerun tells that inputs changed: 'stat' (path, size, modification "
                                          "time, rows) or 'content' (also a checksum of every input file, each "
                                          "read in full once per run)", choices=("stat", "content"))
    max_seq_length: int = _opt(0, "truncate texts to this many tokens (default: the model's max_seq_length)")
    chunk_tokens: int = _opt(0, "split each text into windows of this many tokens (special tokens included, at "
                                "most max-seq-length) instead of truncating it, and write one row per window: "
                                "id, chunk, start_char, end_char, embedding; tokenizes with HF tokenizers, whose "
                                "offsets give the spans (default: 0, truncate)")
    chunk_overlap: int = _opt(0, "with --chunk-tokens: text tokens each window shares with the one before")
    chunk_pooling: str = _opt("none", "with --chunk-tokens: 'mean' writes one row per id instead, the mean of its "
                                      "windows' embeddings (renormalized where the model normalizes)",
                              choices=("none", "mean"))
    pooling: str = _opt("", "override the model's pooling", choices=("", "mean", "cls", "max", "lasttoken"))
    prompt_name: str = _opt("", "prefix every text with the model's prompt of this name (config_sentence_transformers"
                                ".json; default: its default_prompt_name, if it has one)")
    prompt: str | None = _opt(None, "prefix every text with this prompt instead (\"\" for none, even where the model "
                                    "has a default prompt)")
    dimensions: int = _opt(0, "keep the first N dimensions of each embedding (Matryoshka models), cut before "
                              "normalizing (default: all)")
    output_dtype: str = _opt("float32", "how embeddings are stored, as sentence-transformers' quantize_embeddings "
                                        "stores them: float32, float16; int8 or uint8, 256 buckets per dimension "
                                        "between ranges calibrated on the job's own embeddings (see "
                                        "--calibration-rows; recorded in the manifest); or the signs packed 8 to a "
                                        "byte (binary: int8, ubinary: uint8)",
                             choices=("float32", "float16", "int8", "uint8", "binary", "ubinary"))
    output_format: str = _opt("parquet", "'parquet': shards of id and embedding columns; 'npy': each shard's "
                                         "embeddings in a little-endian .npy beside a Parquet file of its ids "
                                         "(memory-mappable, for FAISS)", choices=("parquet", "npy"))
    calibration_rows: int = _opt(10_000, "int8/uint8 output: rows whose embeddings set each dimension's range, "
                                         "taken from up to 16 work units spread over the input; every encoder "
                                         "rank embeds them at start and they agree on one range")
    normalize: bool | None = _opt(None, "L2-normalize embeddings (default: as the model's modules.json says)")
    device: str = _opt("auto", "torch device for the encoder: auto picks cuda when available, else cpu")
    dtype: str = _opt("auto", "encoder dtype: auto is fp32 on CPU, and on CUDA bf16 for decoder (LLM-based) models, "
                              "fp16 for the others; fp8: a decoder's matmuls in e4m3 (the rest bf16), after a "
                              "check against bf16 on the job's own texts (--fp8-min-cosine)",
                      choices=("auto", "fp32", "fp16", "bf16", "fp8"))
    fp8_min_cosine: float = _opt(0.999, "--dtype fp8: before embedding, every encoder rank embeds --fp8-check-rows "
                                        "rows of the job's input in bf16 and in FP8, and the job refuses to run "
                                        "(exit 2) when their minimum cosine is below this; the manifest records it")
    fp8_check_rows: int = _opt(2000, "--dtype fp8: rows the fidelity check embeds, from up to 16 work units spread "
                                     "over the input")
    engine: str = _opt("auto", "encoder: 'varlen' is the padding-free BERT-family fast path, 'torch' the generic "
                               "transformers AutoModel; auto uses varlen where the model allows",
                       choices=("auto", "varlen", "torch"))
    fused_ops: str = _opt("auto", "varlen encoder: how the embedding sum, residual-add+LayerNorm and mean pooling "
                                  "run: 'triton' (hpcembed's fused kernels), 'compile' (torch.compile's, which "
                                  "costs 10-13 s of tracing at every start), 'eager'; auto takes triton on CUDA "
                                  "where Triton imports, eager on CPU",
                          choices=("auto", "triton", "compile", "eager"))
    cuda_graphs: bool | None = _opt(None, "varlen encoder on CUDA: capture the forward as CUDA graphs over token "
                                          "and row buckets at start-up and pad each batch to its bucket (default: "
                                          "on; see bench/notes/gpu_stage.md for what it measured)")
    cache_dir: str = _opt("", "where what start-up computes (compiled kernels, the budtiktok tokenizer's probe, "
                              "model file digests) is kept between runs, shared safely by ranks and jobs (default: "
                              "$HPCEMBED_CACHE_DIR, else $XDG_CACHE_HOME/hpcembed or ~/.cache/hpcembed)")
    attention: str = _opt("auto", "varlen encoder on CUDA: the attention kernel, 'triton' (hpcembed's kernels: for "
                                  "small heads, 2.1x flash attention at MiniLM's shapes on an H200; for decoders' "
                                  "grouped heads, 2.0-2.3x at Qwen3-Embedding's) or 'flash' (torch's varlen flash "
                                  "attention); auto takes triton where Triton imports and takes the heads",
                          choices=("auto", "triton", "flash"))
    exact_gelu: bool = _opt(False, "varlen encoder on CUDA: exact erf GELU as its own kernel, instead of the "
                                   "tanh-approximate GELU fused into the up-projection matmul (faster, same cosine)")
    tokenizer_backend: str = _opt("auto", "tokenizer: 'budtiktok' is the fast Rust backend with HF fallbacks, ids "
                                          "identical to 'hf'; auto uses it where it is installed and proven for "
                                          "the model's tokenizer type (BERT WordPiece)",
                                  choices=("auto", "hf", "budtiktok"))
    max_batch_tokens: int = _opt(0, "token budget of one encoder batch, padding counted where the engine pads "
                                    "(default: 2048 on CPU, where small padded batches measured fastest; "
                                    "262144 on CUDA, fastest on an H100 with 2 instances)")
    dedup: str = _opt("auto", "embed each distinct text once per job: a row whose text (under the same model and "
                               "settings) was already claimed anywhere in the job is not tokenized or encoded "
                               "again, and gets a copy of that embedding under its own id (text input, not chunked, "
                               "at most 64 encoder ranks). auto: on with --reuse, which needs it; off otherwise, "
                               "since on an H200 node it paid only with many repeats (bench/notes/dedup.md)",
                      choices=("auto", "on", "off"))
    reuse: list[str] = _opt([], "earlier hpcembed outputs (complete, same model and settings) whose embeddings are "
                                "copied for rows whose text they already embedded; only the rest is encoded "
                                "(repeatable; needs --dedup)", nargs="+", repeatable=True)
    dedup_memory: float = _opt(4.0, "--dedup: GiB each encoder rank may hold of digests and their embeddings; "
                                    "beyond it new texts are encoded without being recorded")
    window_batches: int = _opt(8, "an encoder rank takes token batches in while fewer than this many batches' "
                                  "tokens wait to be encoded (or one batch for each linked tokenizer rank, up to "
                                  "256, where that is more)")
    unit_rows: int = _opt(50_000, "rows per work unit handed out by the conductor")
    chunk_rows: int = _opt(1024, "rows a tokenizer reads and tokenizes at a time (the batches it sends are cut to "
                                 "the encoder's token budget)")
    steal_rows: int = _opt(4096, "tail stealing: once no unit is left, a tokenizer rank without work takes the "
                                 "second half of what another has not yet read of its unit, while each half keeps "
                                 "at least this many rows (0: off; with sub-conductors, within each node)")
    tokenizer_ranks: int = _opt(0, "MPI: number of tokenizer ranks (default: one encoder rank per GPU, the rest "
                                   "tokenize; without GPUs, half of the ranks after the conductor)")
    sub_conductors: str = _opt("auto", "MPI: a sub-conductor rank on each node hands out the conductor's units to "
                                       "that node's tokenizer ranks and sends their commits on in batches, so that "
                                       "rank 0 keeps up at thousands of encoder ranks. auto: from 512 encoder "
                                       "ranks on (below that a sub-conductor would take a core for nothing)",
                               choices=("auto", "per-node", "off"))
    commit_fanin: int = _opt(32, "MPI, with sub-conductors: they send their commits and reports to rank 0 through "
                                 "a tree with this many below each (rank 0 hears from at most this many, where at "
                                 "the end of a job every node commits at once)")
    gpu_tokens_per_s: float = _opt(0.0, "MPI: tokens/s one encoder rank encodes, for planning how many tokenizer "
                                        "ranks keep it busy (default: the bench/gpu_stage.py figure for its GPU; "
                                        "setting it plans on CPU encoders too)")
    instances_per_gpu: int = _opt(0, "model instances per encoder rank, each on its own thread and CUDA stream "
                                     "(default: 2 for BERT-family models, 1 for decoders, where a second measured "
                                     "no faster on an H200 and holds a second copy of the weights)")
    transport: str = _opt("auto", "MPI: how token batches travel tokenizer -> encoder rank. 'ucx' uses UCX endpoints "
                                  "(RDMA with a UCX that has verbs), 'mpi' MPI messages; auto uses ucx where the "
                                  "ucxx bindings import and batches cross nodes, mpi otherwise",
                          choices=("auto", "mpi", "ucx"))
    credits: int = _opt(4, "token batches an encoder lets each tokenizer have in flight (flow control)")
    rehearse: str = _opt("", "rehearse the job's control plane without tokenizing or encoding: 'TOKENIZER,ENCODER' "
                             "tokens/s of one tokenizer rank and one encoder rank (e.g. 1e6,1.2e7). Every rank runs "
                             "its real role over the real transport, but tokenizer ranks sleep for their tokens at "
                             "the first rate and encoder ranks return zeros at the second, as a GPU would; for "
                             "fan-in studies (bench/fanin.py). The output is marked a rehearsal, never resumed or "
                             "reused as embeddings, and gets no _SUCCESS")
    progress: str = _opt("auto", "progress display: bar on a terminal, log lines otherwise",
                         choices=("auto", "bar", "log", "off"))
    progress_interval: float = _opt(10.0, "seconds between progress log lines")

    def validate(self, serving: bool = False) -> "JobConfig":
        """`serving`: for `hpcembed serve`, which has no input or output."""
        if not self.input and not serving:
            raise ConfigError("no input given: pass --input PATH... or set 'input' in the job file")
        if not self.output and not serving:
            raise ConfigError("no output directory given: pass --output DIR or set 'output' in the job file")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if not self.chunk_tokens and (self.chunk_overlap or self.chunk_pooling != "none"):
            raise ConfigError("chunk-overlap and chunk-pooling need --chunk-tokens N")
        if self.rehearse:
            from .rehearsal import parse_rates
            parse_rates(self.rehearse)
            if self.dtype == "fp8" or self.output_dtype in ("int8", "uint8") or self.chunk_tokens:
                raise ConfigError("--rehearse stands in for the encoder, so it cannot run --dtype fp8's check, "
                                  "calibrate int8/uint8 output or split --chunk-tokens windows; leave those out")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name.replace('_', '-')} must be one of {', '.join(c for c in choices if c)}; "
                                  f"got {getattr(self, f.name)!r}")
        return self

    def batch_tokens_for(self, device: str) -> int:
        # A rehearsal stands in for GPU encoder ranks, whatever device its ranks run on.
        return self.max_batch_tokens or default_batch_tokens("cuda" if self.rehearse else device)


def default_batch_tokens(device: str) -> int:
    return 262144 if device.startswith("cuda") else 2048


FIELDS = {f.name: f for f in dataclasses.fields(JobConfig)}
# The options `hpcembed tokenize` takes; the rest concern the encoder. Its job file may still hold them all, so
# one TOML can drive both steps of a tokenize-then-embed pipeline.
TOKENIZE_FIELDS = ("input", "output", "model", "text_column", "id_column", "on_invalid", "overwrite",
                   "input_fingerprint", "max_seq_length", "tokenizer_backend", "unit_rows", "chunk_rows", "progress",
                   "progress_interval", "steal_rows")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a job file. Keys are the long option names, with '-' or '_'."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"job file {path} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"job file {path}: unknown key {key!r}; valid keys are the long options of "
                              "'hpcembed run'")
        if name == "input" and isinstance(value, str):
            value = [value]
        values[name] = value
    return values


# What each annotation accepts. bool is kept apart from int (True is an int to Python, never a row count here),
# and a float option takes an int (TOML writes 10 for 10.0).
_ACCEPTS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "bool | None": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string"),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}
# Lower bounds of the numeric options.
_AT_LEAST = {"dedup_memory": 0, "max_seq_length": 0, "dimensions": 0, "chunk_tokens": 0, "chunk_overlap": 0,
             "max_batch_tokens": 0, "tokenizer_ranks": 0, "steal_rows": 0,
             "gpu_tokens_per_s": 0,
             "progress_interval": 0.001, "window_batches": 1, "instances_per_gpu": 0, "unit_rows": 1,
             "chunk_rows": 1, "credits": 1, "calibration_rows": 2, "fp8_min_cosine": -1, "fp8_check_rows": 1}


def check_value(name: str, value: Any) -> None:
    """Raise ConfigError naming the option when `value` is not what the field declares (no coercion)."""
    accepts, what = _ACCEPTS[FIELDS[name].type]
    if not accepts(value):
        raise ConfigError(f"{name.replace('_', '-')} must be {what}, got {value!r} ({type(value).__name__})")
    if name in _AT_LEAST and value < _AT_LEAST[name]:
        raise ConfigError(f"{name.replace('_', '-')} must be at least {_AT_LEAST[name]}, got {value!r}")


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any], serving: bool = False) -> JobConfig:
    """Job file values first, then command-line values that were actually given; each checked for its type."""
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for name, value in merged.items():
        check_value(name, value)
    return JobConfig(**merged).validate(serving)
