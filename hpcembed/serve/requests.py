"""What a POST /v1/embeddings body may hold (the OpenAI embeddings API), checked: each mistake is a BadRequest
naming the field and, for a list, the item."""
from __future__ import annotations

import json
from dataclasses import dataclass


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass
class EmbeddingsRequest:
    texts: list[str] | None             # text input, or
    token_ids: list[list[int]] | None   # token id input (used as given, no prompt)
    encoding_format: str                # 'float' or 'base64'
    dimensions: int                     # 0: the model's

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


@dataclass
class Limits:
    model_names: tuple[str, ...]        # what `model` may say
    dim: int
    vocab_size: int
    max_tokens: int                     # a token-id input's longest (the model's max_seq_length)
    max_texts: int
    max_chars: int


def parse(raw: bytes, limits: Limits) -> EmbeddingsRequest:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("'model' is required, a string", "model")
    if model not in limits.model_names:
        raise BadRequest(f"model {model!r} is not served here; this server serves {limits.model_names[0]!r}",
                         "model", status=404, code="model_not_found")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= limits.dim):
        raise BadRequest(f"'dimensions' must be an integer from 1 to {limits.dim}, got {dimensions!r}",
                         "dimensions")
    texts, token_ids = _input(body.get("input", None), limits)
    return EmbeddingsRequest(texts, token_ids, encoding, dimensions or 0)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _input(value, limits: Limits) -> tuple[list[str] | None, list[list[int]] | None]:
    if value is None:
        raise BadRequest("'input' is required: a string, a list of strings, or token ids", "input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadRequest(f"'input' must be a string or a list, got {type(value).__name__}", "input")
    if not value:
        raise BadRequest("'input' is empty", "input")
    if all(_is_int(v) for v in value):
        value = [value]                                     # one text as token ids
    if len(value) > limits.max_texts:
        raise BadRequest(f"'input' has {len(value):,} items, over the limit of {limits.max_texts:,} per request",
                         "input")
    if all(isinstance(v, str) for v in value):
        for k, text in enumerate(value):
            if not text:
                raise BadRequest(f"input[{k}] is an empty string", "input")
            if len(text) > limits.max_chars:
                raise BadRequest(f"input[{k}] has {len(text):,} characters, over the limit of "
                                 f"{limits.max_chars:,}", "input")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(f"input[{k}] is not Unicode text (a lone surrogate escape)", "input") from None
        return value, None
    if all(isinstance(v, list) for v in value):
        for k, ids in enumerate(value):
            if not ids or not all(_is_int(t) for t in ids):
                raise BadRequest(f"input[{k}] must be a non-empty list of integer token ids", "input")
            if len(ids) > limits.max_tokens:
                raise BadRequest(f"input[{k}] has {len(ids):,} tokens; this model takes at most "
                                 f"{limits.max_tokens:,}", "input")
            if limits.vocab_size and not all(0 <= t < limits.vocab_size for t in ids):
                raise BadRequest(f"input[{k}] holds a token id outside the model's vocabulary "
                                 f"(0..{limits.vocab_size - 1})", "input")
        return None, value
    raise BadRequest("'input' must be a string, a list of strings, a list of token ids, or a list of lists of "
                     "token ids (not a mix)", "input")
