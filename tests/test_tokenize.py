"""Token ids must equal sentence-transformers' ids, and work on giant texts must stay bounded."""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest

from hpcembed.engine import ModelSpec
from hpcembed.errors import ConfigError
from hpcembed.tokenize import HFTokenizer, make_tokenizer
from hpcembed.tokenize.budtiktok_backend import BudTikTokTokenizer

from .conftest import EDGE_TEXTS

LONG_TEXTS = [
    "word " * 100_000,                                     # long, spaces everywhere
    " " * 200_000 + "late words arrive " * 300,            # leading whitespace run longer than the window
    "a" * 50_000 + " tail words" * 1000,                    # one giant word first
    "短句。" * 50_000,                                      # CJK, no spaces at all
    ("Mixed 漢字 text, with punctuation!? " * 4000),
]


@pytest.fixture(scope="module")
def backend(model_dir):
    spec = ModelSpec.load(model_dir)
    return HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)


@pytest.fixture(scope="module")
def fast_backend(model_dir):
    pytest.importorskip("budtiktok")
    spec = ModelSpec.load(model_dir)
    backend = make_tokenizer(spec.path, spec.max_seq_length, spec.lowercase, "budtiktok")
    assert isinstance(backend, BudTikTokTokenizer)
    return backend


def as_lists(encoded) -> list[list[int]]:
    return [[int(i) for i in ids] for ids in encoded]


def fuzz_texts(n: int, seed: int) -> list[str]:
    """Random texts mixing words, special-token literals, whitespace and control characters, and code points
    drawn from across the BMP, the SMP and the planes above, where BudTikTok and HF were seen to differ."""
    rng = random.Random(seed)
    words = ["hello", "World", "don't", "e.g.", "caf\u00e9", "na\u00efve", "##ing", "\u03a3\u03bf\u03c6\u03af\u03b1",
             "[MASK]", "[mask]", "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[Mask]", "  ", "\t", "\n", "\r\n", "\u00a0"]
    blocks = [(0x20, 0x7f), (0x0, 0x20), (0x80, 0x250), (0x250, 0x370), (0x300, 0x370), (0x370, 0x530),
              (0x530, 0x700), (0x700, 0x1000), (0x1000, 0x2000), (0x2000, 0x2070), (0x2070, 0x3000),
              (0x3000, 0x3100), (0x4e00, 0x4f00), (0xac00, 0xad00), (0xd7b0, 0xd800), (0xe000, 0xe100),
              (0xf900, 0x10000), (0x10000, 0x10400), (0x1f300, 0x1f700), (0x1f900, 0x1fa00), (0x20000, 0x20100),
              (0xe0000, 0xe0080), (0xf0000, 0xf0010)]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.35:
                parts.append(rng.choice(words))
            else:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randrange(lo, hi)) for _ in range(rng.randint(1, 4))))
            if rng.random() < 0.4:
                parts.append(" ")
        texts.append("".join(parts))
    return texts


def st_ids(st_model, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st_model.tokenize([text])["input_ids"][0].tolist()


def test_ids_equal_sentence_transformers(backend, st_model):
    texts = EDGE_TEXTS + LONG_TEXTS
    ours = backend.encode(texts)
    for text, ids in zip(texts, ours):
        assert ids == st_ids(st_model, text), f"ids differ for {text[:40]!r}"
    assert max(len(i) for i in ours) == 256      # the bundled tokenizer.json's 128 is ignored


def test_giant_text_work_is_bounded(backend, monkeypatch):
    seen = []
    real = backend._tok.encode
    monkeypatch.setattr(backend._tok, "encode", lambda text, *a, **k: (seen.append(len(text)), real(text))[1],
                        raising=False)
    ids = backend.encode(["plain english words " * 200_000])      # 4M characters
    assert len(ids[0]) == 256
    assert seen and max(seen) <= backend.long_text_chars


def test_fast_backend_ids_equal_sentence_transformers(fast_backend, st_model):
    texts = EDGE_TEXTS + LONG_TEXTS
    ours = as_lists(fast_backend.encode(texts))
    for text, ids in zip(texts, ours):
        assert ids == st_ids(st_model, text), f"ids differ for {text[:40]!r}"


def test_fast_backend_equals_hf_on_fuzzed_text(fast_backend, backend):
    texts = fuzz_texts(20_000, seed=7)
    # Long ones too, so truncation (which BudTikTok alone gets wrong) is exercised on every script.
    texts += [" ".join(texts[k: k + 60]) for k in range(0, 6000, 60)]
    before = fast_backend.rows_fallback
    ours = as_lists(fast_backend.encode(texts))
    theirs = backend.encode(texts)
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} texts differ, first {mismatched[0][:80]!r}"
    # The fuzz must reach both paths, or it proves nothing about one of them.
    assert fast_backend.rows_fallback - before > 1000
    assert fast_backend.rows_fast > 1000


def test_fast_backend_equals_hf_on_the_benchmark_corpus(fast_backend, backend):
    from bench.corpus import DEFAULT_PARAGRAPHS, build_documents
    if not DEFAULT_PARAGRAPHS.exists():
        pytest.skip(f"{DEFAULT_PARAGRAPHS} is missing (../shared beside the checkout)")
    docs = build_documents(5000)
    fast_before = fast_backend.rows_fast
    assert as_lists(fast_backend.encode(docs)) == backend.encode(docs)
    assert fast_backend.rows_fast - fast_before > 4500      # real English text stays on the fast path


def test_special_literals_and_unprobed_characters_fall_back(fast_backend, backend):
    texts = ["a [MASK] b", "a [mask] b", "sigma \u03a3 final", "plane 15 \U000f0001 char", "plain ascii words"]
    before = fast_backend.rows_fallback
    assert as_lists(fast_backend.encode(texts)) == backend.encode(texts)
    assert fast_backend.rows_fallback - before == 4
    assert not fast_backend.needs_hf("plain ascii words")
    # A chunk's texts are checked together, in one array: each answer must be its own text's, next to empty,
    # ASCII, unsafe-at-the-edge and lone-surrogate texts.
    chunk = ["", "\u03a3", "safe é", "ends unsafe \u03a3", "", "é starts", "lone \ud800 surrogate", "x" * 3,
             "\U000f0001", "[SEP] literal", "naïve"]
    assert list(fast_backend._needs_hf(chunk)) == [fast_backend.needs_hf(t) for t in chunk]
    assert [fast_backend.needs_hf(t) for t in chunk] == [False, True, False, True, False, False, True, False, True,
                                                         True, False]


def test_fast_backend_bounds_work_on_giant_texts(fast_backend, monkeypatch):
    seen = []
    monkeypatch.setattr(fast_backend, "_bt", _Spy(fast_backend._bt, seen))
    ids = fast_backend.encode(["plain english words " * 200_000])      # 4M characters
    assert len(ids[0]) == 256 and int(ids[0][-1]) == 102                 # truncated, [SEP] kept
    assert seen and max(seen) <= fast_backend.long_text_chars


def test_texts_likely_to_be_truncated_are_cut_first_and_ids_stay_identical(fast_backend, backend, monkeypatch):
    """Texts longer than the cut are encoded from a prefix ending at a space; a prefix that turns out to hold no
    more tokens than truncation keeps is encoded again whole. Either way the ids are HF's for the whole text."""
    words = "the harbour's ships, in rain; and wind\tfrom the west\nover grey water".split(" ")
    english = [" ".join(words[(k + j) % len(words)] for j in range(400 + 13 * k)) for k in range(40)]
    monkeypatch.setattr(fast_backend, "_tokens", 1000.0)      # as after a few texts of another kind
    monkeypatch.setattr(fast_backend, "_chars", 2000.0)
    fast_backend.encode(english)                     # the running rate learns this prose
    chars_per_token = fast_backend._chars / fast_backend._tokens
    assert 2.5 < chars_per_token < 6.0, chars_per_token
    seen: list[int] = []
    monkeypatch.setattr(fast_backend, "_bt", _Spy(fast_backend._bt, seen))
    limit = fast_backend._cut_chars()
    assert as_lists(fast_backend.encode(english)) == backend.encode(english)
    assert max(seen) <= limit < min(len(t) for t in english)       # every one cut, none encoded again
    # A rate far too low (as if the texts so far were all punctuation): the cut prefixes are too short, and
    # those texts are encoded again whole.
    monkeypatch.setattr(fast_backend, "_chars", 1.0 * fast_backend._tokens)
    recut = fast_backend.recut
    dense = english[:10] + ["word " * 120, "short text"]
    assert as_lists(fast_backend.encode(dense)) == backend.encode(dense)
    assert fast_backend.recut - recut >= 10


class _Spy:
    """Records the length of every text handed to BudTikTok's single-text encode."""

    def __init__(self, inner, seen):
        self._inner, self._seen = inner, seen

    def encode(self, text, *args, **kwargs):
        self._seen.append(len(text))
        return self._inner.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self._seen.extend(len(t) for t in texts)
        return self._inner.encode_batch(texts, *args, **kwargs)


def test_backend_choice_follows_the_tokenizer_pipeline(model_dir, tmp_path):
    pytest.importorskip("budtiktok")
    spec = ModelSpec.load(model_dir)
    assert isinstance(make_tokenizer(spec.path, 256, False, "auto"), BudTikTokTokenizer)
    assert isinstance(make_tokenizer(spec.path, 256, False, "hf"), HFTokenizer)
    # The same vocabulary with another normalizer: not a pipeline budtiktok was proven on.
    other = tmp_path / "model"
    shutil.copytree(spec.path, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    assert isinstance(make_tokenizer(other, 256, False, "auto"), HFTokenizer)
    with pytest.raises(ConfigError, match="not one budtiktok was proven identical"):
        make_tokenizer(other, 256, False, "budtiktok")


def test_budtiktok_probe_is_kept_in_the_cache(model_dir, tmp_path):
    """The code-point probe runs once per tokenizer and library versions: later starts read it from the cache
    directory; a damaged entry is probed again; another tokenizer file is another entry."""
    pytest.importorskip("budtiktok")
    from hpcembed.tokenize.budtiktok_backend import unsafe_codepoints
    path = str(Path(ModelSpec.load(model_dir).path) / "tokenizer.json")
    cache = tmp_path / "cache"
    probed = unsafe_codepoints(path, cache)
    assert probed, "the probe found no code point budtiktok tokenizes differently: FACTS.md says it should"
    [entry] = (cache / "budtiktok").glob("unsafe-*.json")
    assert json.loads(entry.read_text())["unsafe"] == list(probed)
    entry.write_text(json.dumps({"unsafe": [0x3A3]}))           # edited in place: read, not probed again
    assert unsafe_codepoints(path, cache) == (0x3A3,)
    for damaged in ('{"unsafe": [1, 2', '{"unsafe": [1, 1114111]}', '["not", "an", "entry"]'):
        entry.write_text(damaged)                               # cut short, out of range, not an entry
        assert unsafe_codepoints(path, cache) == probed
    assert json.loads(entry.read_text())["unsafe"] == list(probed)
    other = tmp_path / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(json.dumps(json.loads(Path(path).read_text(encoding="utf-8")), indent=1), encoding="utf-8")
    unsafe_codepoints(str(other), cache)
    assert len(list((cache / "budtiktok").glob("unsafe-*.json"))) == 2
