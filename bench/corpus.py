"""The benchmark corpus recipe (shared/FACTS.md), so every figure is measured on the same documents.

Seed 0; each document joins consecutive paragraphs of shared/corpus/paragraphs.txt.gz until it reaches a word
target drawn from lognormvariate(4.1, 0.8), clipped to 5..400 words, and is cut at that target. Cutting is what
reproduces FACTS.md's mean of 147.4 tokens after truncation at 256 (147 on the first 5k documents); keeping the
whole last paragraph gives ~177."""
from __future__ import annotations

import gzip
import random
from pathlib import Path

DEFAULT_PARAGRAPHS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "paragraphs.txt.gz"


def build_documents(n_docs: int, paragraphs: Path = DEFAULT_PARAGRAPHS, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs: list[str] = []
    with gzip.open(paragraphs, "rt", encoding="utf-8") as fh:
        paras = (line.strip() for line in fh)
        while len(docs) < n_docs:
            target = min(400, max(5, int(rng.lognormvariate(4.1, 0.8))))
            words: list[str] = []
            while len(words) < target:
                try:
                    words.extend(next(paras).split())
                except StopIteration:
                    if not docs and not words:
                        raise ValueError(f"{paragraphs} holds no paragraphs") from None
                    fh.seek(0)          # wrap around for corpora larger than the paragraph file
                    paras = (line.strip() for line in fh)
            docs.append(" ".join(words[:target]))
    return docs


def build_queries(n_queries: int, paragraphs: Path = DEFAULT_PARAGRAPHS, seed: int = 7) -> list[str]:
    """The short-query corpus: seed 7; each query is 8 to 20 consecutive words (uniform) cut from a random place
    in the next paragraph of the same file (the whole paragraph when it is shorter), wrapping around the file."""
    rng = random.Random(seed)
    queries: list[str] = []
    while len(queries) < n_queries:
        before = len(queries)
        with gzip.open(paragraphs, "rt", encoding="utf-8") as fh:
            for line in fh:
                words = line.split()
                if not words:
                    continue
                n = rng.randint(8, 20)
                start = rng.randrange(max(1, len(words) - n + 1))
                queries.append(" ".join(words[start: start + n]))
                if len(queries) == n_queries:
                    break
        if len(queries) == before:
            raise ValueError(f"{paragraphs} holds no paragraphs")
    return queries


CORPORA = {"standard": build_documents, "short": build_queries}


def write_parquet(docs: list[str], path: Path, files: int = 1, row_group_size: int = 10_000) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.mkdir(parents=True, exist_ok=True)
    out = []
    per = -(-len(docs) // files)
    for k in range(files):
        part = docs[k * per:(k + 1) * per]
        ids = [f"doc-{k * per + i:09d}" for i in range(len(part))]
        target = path / f"corpus-{k:04d}.parquet"
        pq.write_table(pa.table({"id": ids, "text": part}), target, row_group_size=row_group_size)
        out.append(target)
    return out
