"""Token ids must equal sentence-transformers' ids, and work on giant texts must stay bounded."""
from __future__ import annotations

import warnings

import pytest

from hpcembed.engine import ModelSpec
from hpcembed.tokenize import HFTokenizer

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
