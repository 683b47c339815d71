"""The two kinds of job, as the launchers see them. An embedding job (`hpcembed run`) has conductor, tokenizer and
encoder ranks and writes Parquet embeddings; a tokenize job (`hpcembed tokenize`) has conductor and tokenizer ranks
only, each writing its own token shards (io/tokens.py), which an embedding job later reads like any input.

Each kind supplies what differs: its fingerprint (what makes two runs the same job), its output, the sink its
tokenizer ranks deliver to, whether it has encoder ranks, and its section of the manifest. Nothing else in the
launchers knows which kind it runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import JobConfig
from ..cache import cache_dir
from ..engine.model import ModelSpec
from ..errors import ConfigError
from ..io import location
from ..io.digest import file_content_digest, file_digest
from ..io.ledger import model_identity
from ..io.sources import Plan
from ..io.tokens import check_tokenizer_matches, read_token_manifest
from ..roles.sinks import EncoderSink, ShardSink
from ..tokenize.chunk import Chunker


class JobKind:
    name: str
    tokens_out: bool                # OutputDir(tokens=...): token shards rather than embedding shards
    has_encoders: bool
    checks_committed_ids: bool      # tokenizer ranks check new ids against the shards earlier runs committed

    def check_inputs(self, cfg: JobConfig, spec: ModelSpec, tokenizer: dict) -> None:
        raise NotImplementedError

    def check_model(self, cfg: JobConfig, spec: ModelSpec) -> None:
        """Options that the model rules out."""

    def fingerprint(self, cfg: JobConfig, spec: ModelSpec, plan: Plan, dtype: str, tokenizer: dict) -> dict:
        raise NotImplementedError

    def transport_choice(self, cfg: JobConfig) -> str:
        return cfg.transport

    def sink(self, output_path):
        raise NotImplementedError

    def manifest_section(self, spec: ModelSpec, dtype: str, device: str, tokenizer: dict) -> dict:
        raise NotImplementedError

    def describe(self, spec: ModelSpec, tokenizer: dict) -> str:
        raise NotImplementedError


def input_identity(cfg: JobConfig, plan: Plan) -> list:
    """Each input's absolute path, size, modification time (ns) and planned rows: an input edited in place, even
    to the same size, is another job. With --input-fingerprint content, also a checksum of its bytes (not
    cached: it is asked for to catch an edit that kept the size and time)."""
    inputs = []
    for f in plan.files:
        path = f.path if location.is_url(f.path) else os.path.abspath(f.path)
        st = location.stat(path)
        entry = [path, st[0] if st else None, plan.file_rows.get(f.index), st[1] if st else None]
        if cfg.input_fingerprint == "content" and st is not None:
            entry.append(file_digest(path) if location.is_url(path) else file_content_digest(Path(path), None))
        inputs.append(entry)
    return inputs



def digest_of(cfg: JobConfig, plan: Plan) -> str:
    """What an embedding job's rows are digested by (io/digest.py, as roles/tokenizer.py does it): their text, or
    the token ids of a token directory's rows and of a chunked text's windows; a job may mix the first two."""
    if cfg.chunk_tokens:
        return "token ids"
    tokens = {f.format == "tokens" for f in plan.files}
    return "token ids" if tokens == {True} else "text" if True not in tokens else "text, token ids"


def chunking(cfg: JobConfig) -> dict:
    """The chunk settings of a chunked job (none otherwise, so unchunked jobs keep the fingerprint they had)."""
    if not cfg.chunk_tokens:
        return {}
    return {"chunk_tokens": cfg.chunk_tokens, "chunk_overlap": cfg.chunk_overlap, "chunk_pooling": cfg.chunk_pooling}


def prompting(spec: ModelSpec) -> dict:
    """The prompt and --dimensions where a job has them (none otherwise, so other jobs keep their fingerprint)."""
    return {**({"prompt": spec.prompt, "prompt_tokens_pooled": not spec.pool_skip} if spec.prompt else {}),
            **({"dimensions": spec.truncate_dim} if spec.truncate_dim else {})}


def digest_cache(cfg: JobConfig) -> Path | None:
    """Where model digests are cached: the kernel cache directory, if it can be made."""
    path = cache_dir(cfg.cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


class EmbedJob(JobKind):
    name, tokens_out, has_encoders, checks_committed_ids = "embed", False, True, True

    def check_inputs(self, cfg: JobConfig, spec: ModelSpec, tokenizer: dict) -> None:
        for pattern in cfg.input:
            manifest = read_token_manifest(pattern) if os.path.isdir(pattern) else None
            if manifest is not None:
                if cfg.chunk_tokens:
                    raise ConfigError(f"--chunk-tokens needs the texts, and input {pattern} is a token directory "
                                      "(its texts were truncated when it was tokenized)")
                if spec.prompt:
                    raise ConfigError(f"input {pattern} is a token directory, tokenized without a prompt, and this "
                                      f"job would prefix texts with {spec.prompt!r}; embed the texts instead, or "
                                      "pass --prompt '' to embed the ids as they are")
                check_tokenizer_matches(pattern, manifest.get("tokenizer", {}), tokenizer)

    def check_model(self, cfg: JobConfig, spec: ModelSpec) -> None:
        if cfg.chunk_tokens and spec.prompt:
            raise ConfigError(f"a prompt ({spec.prompt!r}) with --chunk-tokens is not supported: each window would "
                              "need it; pass --prompt '' or embed without chunks")
        if cfg.chunk_tokens > spec.max_seq_length:
            raise ConfigError(f"chunk-tokens {cfg.chunk_tokens} is more than the {spec.max_seq_length} tokens "
                              f"{spec.name} takes (max_seq_length)")
        if cfg.chunk_tokens:
            Chunker.for_model(spec.path, cfg.chunk_tokens, cfg.chunk_overlap, spec.lowercase)   # checks N and K

    def fingerprint(self, cfg: JobConfig, spec: ModelSpec, plan: Plan, dtype: str, tokenizer: dict) -> dict:
        """Same inputs (path, size, modification time, rows), same model (by content) and embedding settings,
        same work units."""
        return {"inputs": input_identity(cfg, plan), "model": spec.name,
                "model_id": model_identity(spec.path, digest_cache(cfg), tuple(d.path for d in spec.dense)),
                "pooling": spec.pooling, "normalize": spec.normalize, "max_seq_length": spec.max_seq_length,
                "dtype": dtype, "text_column": cfg.text_column, "id_column": cfg.id_column,
                "output_dtype": cfg.output_dtype, "unit_rows": cfg.unit_rows,
                "generated_ids": "path-in-input",     # '<path within its input, no extension>:<row>'
                # Shards carry each row's digest (io/digest.py); outputs of versions that digested text rows by
                # their token ids resume only with --overwrite.
                "row_digest": f"xxh3-128 of {digest_of(cfg, plan)}",
                **chunking(cfg), **({"output_format": "npy"} if cfg.output_format == "npy" else {}),
                **prompting(spec), **({"rehearsal": cfg.rehearse} if cfg.rehearse else {})}

    def sink(self, output_path):
        return EncoderSink()

    def manifest_section(self, spec: ModelSpec, dtype: str, device: str, tokenizer: dict) -> dict:
        return {"kind": "embeddings", "model": spec.name, "model_path": spec.path, "architecture": spec.architecture,
                "dim": spec.dim, "dtype": dtype, "device": device, "pooling": spec.pooling,
                "normalize": spec.normalize, "max_seq_length": spec.max_seq_length, "tokenizer": tokenizer,
                **prompting(spec)}

    def describe(self, spec: ModelSpec, tokenizer: dict) -> str:
        return f"model {spec.name} ({spec.pooling} pooling, max {spec.max_seq_length} tokens)"


class TokenizeJob(JobKind):
    name, tokens_out, has_encoders, checks_committed_ids = "tokenize", True, False, False

    def check_inputs(self, cfg: JobConfig, spec: ModelSpec, tokenizer: dict) -> None:
        for pattern in cfg.input:
            if os.path.isdir(pattern) and read_token_manifest(pattern) is not None:
                raise ConfigError(f"input {pattern} is already a token directory; embed it with `hpcembed run "
                                  f"--input {pattern}`")

    def fingerprint(self, cfg: JobConfig, spec: ModelSpec, plan: Plan, dtype: str, tokenizer: dict) -> dict:
        """The backend is not part of it: every backend gives the same ids, so a job may resume with another."""
        return {"kind": "tokens", "inputs": input_identity(cfg, plan), "tokenizer": tokenizer,
                "text_column": cfg.text_column, "id_column": cfg.id_column, "unit_rows": cfg.unit_rows}

    def transport_choice(self, cfg: JobConfig) -> str:
        return "mpi"                # no batch leaves its rank: nothing for UCX to carry

    def sink(self, output_path):
        return ShardSink(Path(output_path))

    def manifest_section(self, spec: ModelSpec, dtype: str, device: str, tokenizer: dict) -> dict:
        return {"kind": "tokens", "tokenizer": tokenizer, "model": spec.name, "model_path": spec.path}

    def describe(self, spec: ModelSpec, tokenizer: dict) -> str:
        return f"tokenizer of {spec.name} (tokenizer {tokenizer['fingerprint']}, max {spec.max_seq_length} tokens)"


KINDS = {"run": EmbedJob(), "tokenize": TokenizeJob()}
