"""The BudTikTok backend: the `budtiktok` Rust wheel for the rows it tokenizes exactly as HF does, HF for the rest.

BudTikTok is several times faster per core than HF `tokenizers`, but on its own it is not identical (FACTS.md):
its truncation drops the final [SEP], it ignores tokenizer.json's padding and truncation settings, a literal
special token such as "[MASK]" in a text is split instead of mapped to its id, and several hundred code points
(final sigma, some spaces and punctuation of many scripts, most of the planes above the SMP) tokenize
differently. So this backend:

- encodes untruncated and truncates itself, keeping the template's trailing special tokens;
- bounds the work on giant texts the way the HF backend does (a prefix cut at a space, used only when it already
  yields more tokens than truncation keeps), and cuts every text that is likely to be truncated the same way
  before encoding it: a quarter of the benchmark corpus' tokens were thrown away by truncation. The cut is the
  characters that max_seq_length tokens have spanned in this backend's texts so far, with a margin; a text whose
  prefix turns out too short is encoded again whole, so the ids never depend on it;
- sends to HF every text that holds a special-token literal (compared case-insensitively, to be safe) or any code
  point that BudTikTok was not found to tokenize identically. Those code points are found by probing every code
  point of the BMP and SMP against HF, in groups that are split only when a group differs (about 2 s). The
  result is kept in the cache directory (hpcembed/cache.py), keyed by the tokenizer file's content and both
  libraries' versions, so only the first start on a machine pays it;
- is only offered for tokenizer pipelines it was proven identical on (`supported`): the BERT WordPiece family.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from ..cache import read_entry, write_entry
from .hf import HFTokenizer

# Tokenizer pipelines on which BudTikTok plus the fallbacks above gave ids identical to HF for every row of the
# tests (edge cases, fuzzed text from every probed script, the benchmark corpus). Others use HF.
PROVEN_PIPELINES = [
    {"model": "WordPiece", "normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer",
     "post_processor": "TemplateProcessing"},
    {"model": "WordPiece", "normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer",
     "post_processor": "BertProcessing"},
]
PROBE_LIMIT = 0x20000          # code points from U+0080 up to here are probed; everything above falls back
PROBE_GROUP = 64
PROBE_VERSION = 1              # part of the cache key: change it when the probe itself changes
CUT_MARGIN = 1.2               # a text's cut: max_seq_length tokens at the running characters per token, and 20%
CUT_SAMPLE_TOKENS = 200_000    # the running characters per token: over about this many tokens
CUT_RATE_MIN_TOKENS = 32       # texts shorter than this (in content tokens) do not move the rate


def pipeline_of(tokenizer_json: dict) -> dict:
    def kind(part):
        return (part or {}).get("type")
    return {"model": kind(tokenizer_json.get("model")), "normalizer": kind(tokenizer_json.get("normalizer")),
            "pre_tokenizer": kind(tokenizer_json.get("pre_tokenizer")),
            "post_processor": kind(tokenizer_json.get("post_processor"))}


def unsupported_reason(model_dir: str | Path) -> str | None:
    """Why the budtiktok backend cannot be used for this model, or None when it can."""
    if importlib.util.find_spec("budtiktok") is None:
        return "the budtiktok package is not installed (pip install budtiktok)"
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return f"{model_dir} has no tokenizer.json"
    pipeline = pipeline_of(json.loads(path.read_text(encoding="utf-8")))
    if pipeline not in PROVEN_PIPELINES:
        return (f"its tokenizer pipeline {pipeline} is not one budtiktok was proven identical to HF on "
                f"(the BERT WordPiece family)")
    return None


def _probe_text(codepoints: list[int]) -> str:
    # Each code point between letters, alone, doubled, and after an accented capital: the contexts in which
    # normalization, splitting and accent handling differed when this was written.
    return " ".join(f"a{chr(c)}b {chr(c)} y{chr(c)}{chr(c)}z \u00c9{chr(c)}" for c in codepoints)


def _probe_key(tokenizer_path: str) -> str:
    from importlib.metadata import version
    key = hashlib.blake2b(Path(tokenizer_path).read_bytes(), digest_size=16)
    key.update(json.dumps([version("budtiktok"), version("tokenizers"), PROBE_LIMIT, PROBE_GROUP,
                           PROBE_VERSION]).encode())
    return key.hexdigest()


def unsafe_codepoints(tokenizer_path: str, cache: Path | None = None) -> tuple[int, ...]:
    """Code points in U+0080..PROBE_LIMIT for which BudTikTok and HF disagree: from `cache` (a directory) where an
    earlier run probed the same tokenizer with the same libraries, else probed now and kept there."""
    entry = cache / "budtiktok" / f"unsafe-{_probe_key(tokenizer_path)}.json" if cache is not None else None
    if entry is not None:
        found = read_entry(entry)
        codepoints = found.get("unsafe") if found else None
        if isinstance(codepoints, list) and all(isinstance(c, int) and 0 <= c < PROBE_LIMIT for c in codepoints):
            return tuple(codepoints)
    unsafe = _probe(tokenizer_path)
    if entry is not None:
        write_entry(entry, {"tokenizer": tokenizer_path, "unsafe": list(unsafe)})
    return unsafe


@functools.lru_cache(maxsize=4)
def _probe(tokenizer_path: str) -> tuple[int, ...]:
    """Probe every candidate code point in groups, splitting a group only where the two disagree."""
    import budtiktok
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(tokenizer_path)
    hf.no_padding()
    hf.no_truncation()
    bt = budtiktok.Tokenizer.from_file(tokenizer_path)
    candidates = [c for c in range(0x80, PROBE_LIMIT) if not 0xD800 <= c < 0xE000]
    groups = [candidates[k: k + PROBE_GROUP] for k in range(0, len(candidates), PROBE_GROUP)]
    unsafe: list[int] = []
    while groups:
        texts = [_probe_text(g) for g in groups]
        differing = [g for g, h, b in zip(groups, hf.encode_batch(texts), bt.encode_batch(texts)) if h.ids != b.ids]
        groups = []
        for g in differing:
            if len(g) == 1:
                unsafe.extend(g)
            else:
                groups += [g[: len(g) // 2], g[len(g) // 2:]]
    return tuple(sorted(unsafe))


class BudTikTokTokenizer:
    name = "budtiktok"

    def __init__(self, model_dir: str | Path, hf: HFTokenizer, probe_cache: Path | None = None):
        """`probe_cache`: the directory the code-point probe is kept in (None: probe every time)."""
        import budtiktok
        path = str(Path(model_dir) / "tokenizer.json")
        reason = unsupported_reason(model_dir)
        if reason:
            raise ValueError(reason)
        self._bt = budtiktok.Tokenizer.from_file(path)
        self.hf = hf
        self.max_seq_length, self.lowercase, self.long_text_chars = hf.max_seq_length, hf.lowercase, hf.long_text_chars
        # How many special tokens the template puts after the text: truncation keeps them.
        probe = hf._tok.encode("a")
        self._tail = len(probe.special_tokens_mask) - 1 - max(
            k for k, special in enumerate(probe.special_tokens_mask) if not special)
        self._specials = sum(probe.special_tokens_mask)
        # A lookup table over the probed range: True where HF must tokenize. Surrogates, and everything above the
        # range (mostly unassigned and private-use planes, all looked up at PROBE_LIMIT), fall back too.
        self._unsafe = np.zeros(PROBE_LIMIT + 1, dtype=bool)
        self._unsafe[list(unsafe_codepoints(path, probe_cache))] = True
        self._unsafe[0xD800: 0xE000] = self._unsafe[PROBE_LIMIT] = True
        specials = sorted({t["content"] for t in json.loads(Path(path).read_text(encoding="utf-8"))["added_tokens"]},
                          key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(s) for s in specials), re.IGNORECASE) if specials else None
        # A substring test per first character is far cheaper than the regex, and most texts hold none of them.
        self._special_starts = sorted({c for s in specials for c in (s[:1].lower(), s[:1].upper())})
        self.rows_fast = self.rows_fallback = 0
        self.truncated = 0          # by this backend; the HF fallback counts its own
        # Characters per token of the texts encoded so far (English prose: about 4.2), from which a text's cut is
        # placed; and how many cut texts had to be encoded again whole.
        self._chars, self._tokens = 4.0 * CUT_SAMPLE_TOKENS, float(CUT_SAMPLE_TOKENS)
        self.recut = 0
        self.cut_texts = True       # False: encode every text whole (bench/tokenize_backends.py's baseline)

    def describe(self) -> dict:
        return {"tokenizer_backend": self.name, "rows_budtiktok": self.rows_fast,
                "rows_hf_fallback": self.rows_fallback, "texts_truncated": self.truncated + self.hf.truncated}

    def needs_hf(self, text: str) -> bool:
        return bool(self._needs_hf([text])[0])

    def _needs_hf(self, texts: list[str]) -> np.ndarray:
        """Which texts HF must tokenize: those holding a code point BudTikTok was not proven on, or a special-token
        literal. The code points of a chunk's non-ASCII texts are looked up together, as one UTF-32 array (a
        regular expression per text took 16% of a tokenizer rank's time on the benchmark corpus)."""
        out = np.zeros(len(texts), dtype=bool)
        wide = [k for k, t in enumerate(texts) if not t.isascii()]
        if wide:
            codepoints = np.frombuffer("".join(texts[k] for k in wide).encode("utf-32-le", "surrogatepass"),
                                       dtype=np.uint32)
            unsafe = self._unsafe[np.minimum(codepoints, PROBE_LIMIT)]
            starts = np.cumsum([0] + [len(texts[k]) for k in wide[:-1]])     # non-ASCII texts are never empty
            out[wide] = np.logical_or.reduceat(unsafe, starts)
        if self._special is not None:
            for k, t in enumerate(texts):
                if not out[k] and any(c in t for c in self._special_starts) and self._special.search(t):
                    out[k] = True
        return out

    def _truncate(self, ids: np.ndarray) -> np.ndarray:
        limit = self.max_seq_length
        if len(ids) <= limit:
            return ids
        self.truncated += 1
        return np.concatenate((ids[: limit - self._tail], ids[len(ids) - self._tail:]))

    def encode(self, texts: list[str]) -> list:
        """Token ids per text: numpy uint32 arrays where BudTikTok encoded, lists where HF did."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        out: list[list[int] | None] = [None] * len(texts)
        fast, slow = [], []
        for k, hf in enumerate(self._needs_hf(texts)):
            (slow if hf else fast).append(k)
        if fast:
            self._encode_fast(texts, fast, out)
        if slow:
            # Already lowercased: the HF backend must not do it twice (it is idempotent, but costs time).
            for k, ids in zip(slow, self.hf.encode_prepared([texts[k] for k in slow])):
                out[k] = ids
        self.rows_fast += len(fast)
        self.rows_fallback += len(slow)
        return out  # type: ignore[return-value]

    def _cut_chars(self) -> int:
        """Where a text is cut before encoding: the characters max_seq_length tokens span at this backend's
        running rate (characters per token of the text, special tokens left out), with CUT_MARGIN to spare."""
        return int(self.max_seq_length * self._chars / self._tokens * CUT_MARGIN)

    def _encode_fast(self, texts: list[str], rows: list[int], out: list) -> None:
        """BudTikTok's encoding of texts[rows] into out[rows], truncated. Texts longer than the cut are encoded
        from a prefix that ends at a space; where it yields no more tokens than truncation keeps, the whole text
        is encoded after all."""
        limit = min(self._cut_chars(), self.long_text_chars) if self.cut_texts else self.long_text_chars
        batch, cut = [], []
        for k in rows:
            text = texts[k]
            space = text.rfind(" ", 0, limit) if len(text) > limit else -1
            batch.append(text[:space] if space > 0 else text)
            cut.append(space > 0)
        again, chars, tokens = [], 0, 0
        for k, text, was_cut, enc in zip(rows, batch, cut, self._bt.encode_batch(batch)):
            ids = enc.get_ids_numpy()               # uint32; numpy is 8x cheaper than .ids
            content = len(ids) - self._specials     # every text encoded, cut or not, is a sample of the rate
            if content >= CUT_RATE_MIN_TOKENS:
                chars, tokens = chars + len(text), tokens + content
            if was_cut and len(ids) <= self.max_seq_length:
                again.append(k)
                continue
            out[k] = self._truncate(ids)
        if again:
            self.recut += len(again)
            whole = [k for k in again if len(texts[k]) <= self.long_text_chars]
            for k, enc in zip(whole, self._bt.encode_batch([texts[k] for k in whole])):
                out[k] = self._truncate(enc.get_ids_numpy())
            for k in again:
                if out[k] is None:          # a giant text: wider prefixes first (_encode_long)
                    out[k] = self._encode_long(texts[k])
        if tokens:              # a running rate over about the last CUT_SAMPLE_TOKENS tokens
            keep = max(0.0, 1.0 - tokens / CUT_SAMPLE_TOKENS)
            self._chars, self._tokens = self._chars * keep + chars, self._tokens * keep + tokens

    def _encode_long(self, text: str) -> list[int]:
        cut = text.rfind(" ", 0, self.long_text_chars)
        if cut > 0 and not self.needs_hf(text[:cut]):
            ids = self._bt.encode(text[:cut]).get_ids_numpy()
            # More tokens than truncation keeps: every kept token came from whole words before the cut.
            if len(ids) > self.max_seq_length:
                return self._truncate(ids)
        return self.hf.encode_prepared([text])[0]

    def fingerprint(self) -> str:
        return self.hf.fingerprint()
