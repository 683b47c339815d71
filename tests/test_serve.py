"""`hpcembed serve` (issue 24): a real server on loopback, started and stopped by PID, in one process and under
mpiexec with roles (a frontend, tokenizer ranks, an encoder rank), and real clients: the openai SDK (its
embeddings equal `hpcembed run` on the same texts), aiohttp for raw bodies, concurrent load and the two lanes,
every bad request, /metrics, and SIGTERM with requests in flight."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import MPI_ENV, MPIEXEC, EDGE_TEXTS, BackgroundJob, process_tree, read_output, run_cli, write_jsonl

aiohttp = pytest.importorskip("aiohttp")
MAX_TEXTS, MAX_CHARS = 64, 20_000
TEXTS = [t for t in EDGE_TEXTS if t and len(t) <= MAX_CHARS] + ["served text %d about ships and rain" % k
                                                                   for k in range(12)]
BULK_TEXT = "a longer passage about the sea, ships, harbours and the weather that comes in from the west " * 3


RANKS = 4         # on a CPU: the frontend, two tokenizer ranks, one encoder rank


def start_server(tmp_path, model_dir, *options: str, ranks: int = 0) -> tuple[BackgroundJob, str]:
    """`ranks`: under mpiexec with that many ranks; 0, one process."""
    launcher, env = ([MPIEXEC, "-n", str(ranks)], MPI_ENV) if ranks else ([], {})
    job = BackgroundJob([*launcher, sys.executable, "-m", "hpcembed", "serve", "--port", "0", "--model", model_dir,
                         "--max-request-texts", str(MAX_TEXTS), "--max-text-chars", str(MAX_CHARS), *options],
                        tmp_path / "serve.log", {"HF_HUB_OFFLINE": "1", **env})
    try:
        url = job.wait_for(r"http://127\.0\.0\.1:\d+", timeout=120)
    except BaseException:
        job.stop()
        raise
    return job, url


@pytest.fixture(scope="module", params=["process", "ranks"])
def server(request, tmp_path_factory, model_dir):
    if request.param == "process":
        # A tokenizing process for bulk requests, as on a GPU (CPU's default is none): bulk requests here take
        # that path, single texts the threads.
        job, url = start_server(tmp_path_factory.mktemp("serve"), model_dir, "--tokenizer-processes", "1")
    else:
        # Pieces of 16 texts: every bulk request here is tokenized by both tokenizer ranks.
        job, url = start_server(tmp_path_factory.mktemp("serve-ranks"), model_dir, "--bulk-piece-texts", "16",
                                ranks=RANKS)
        assert "1 frontend, 2 tokenizer, 1 encoder ranks" in job.text()
    yield url, json.loads(_get(url + "/health")[1])["model"]
    job.stop()


def _get(url: str) -> tuple[int, bytes]:
    async def go():
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, await resp.read()
    return asyncio.run(go())


async def _post(session, url: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url + "/v1/embeddings", data=data, headers=headers or {}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _bulk_queued(session, url: str, at_least: int, timeout: float = 120) -> None:
    """Wait until the server's /metrics shows `at_least` bulk requests waiting, whatever the machine's speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(url + "/metrics") as resp:
            page = (await resp.text()).splitlines()
        waiting = [float(line.split()[-1]) for line in page if line.startswith('hpcembed_queue_requests{lane="bulk"}')]
        if waiting and waiting[0] >= at_least:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} bulk requests ever waited")


def _run_reference(tmp_path, model_dir, texts: list[str]) -> np.ndarray:
    """`hpcembed run` on the same texts: what the service must answer."""
    src = write_jsonl(tmp_path / "texts.jsonl", [{"id": f"t{k:03d}", "text": t} for k, t in enumerate(texts)])
    out = tmp_path / "run"
    proc = run_cli("run", "--input", str(src), "--output", str(out), "--model", model_dir, "--progress", "off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = read_output(out)
    return np.stack([got[f"t{k:03d}"] for k in range(len(texts))])


def test_openai_client_gets_what_hpcembed_run_writes(server, tmp_path, model_dir):
    import openai
    from hpcembed.tokenize import HFTokenizer
    url, name = server
    want = _run_reference(tmp_path, model_dir, TEXTS)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    # Asked for floats; asked for base64 (the client hands back the strings: little-endian float32); and left to
    # the client, which asks for base64 and decodes it itself.
    for encoding in ("float", "base64", None):
        options = {"encoding_format": encoding} if encoding else {}
        resp = client.embeddings.create(model=name, input=TEXTS, **options)
        data = sorted(resp.data, key=lambda d: d.index)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else
                        d.embedding for d in data], dtype=np.float32)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
    tok = HFTokenizer.from_model_dir(model_dir, 256)
    ids = tok.encode(TEXTS)
    assert resp.usage.prompt_tokens == sum(len(t) for t in ids)
    # Token ids in, and Matryoshka dimensions: cut, then normalized again, as --dimensions does.
    by_ids = client.embeddings.create(model=name, input=ids, dimensions=128)
    cut = want[:, :128] / np.linalg.norm(want[:, :128], axis=1, keepdims=True)
    got = np.array([d.embedding for d in by_ids.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), 128) and np.abs(got - cut).max() < 1e-5
    single = client.embeddings.create(model=name, input=TEXTS[5])
    assert np.abs(np.array(single.data[0].embedding) - want[5]).max() < 1e-5


def test_raw_float32_body_health_and_metrics(server):
    url, name = server

    async def go():
        async with aiohttp.ClientSession() as session:
            raw = await _post(session, url, {"model": name, "input": TEXTS[:7]},
                              {"Accept": "application/octet-stream"})
            as_json = await _post(session, url, {"model": name, "input": TEXTS[:7]})
            return raw, as_json
    (status, headers, body), (_, json_headers, as_json) = asyncio.run(go())
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    # Server-Timing: each stage and their total, in milliseconds; the total holds the stages.
    for timing in (headers["Server-Timing"], json_headers["Server-Timing"]):
        stages = dict(re.findall(r"([\w-]+);dur=([\d.]+)", timing))
        assert set(stages) == {"read-parse", "embed", "answer", "total"}, timing
        assert float(stages["embed"]) > 0 and float(stages["total"]) >= sum(
            float(v) for k, v in stages.items() if k != "total") - 0.01, timing
    rows, dim = int(headers["X-Embedding-Rows"]), int(headers["X-Embedding-Dim"])
    matrix = np.frombuffer(body, dtype="<f4").reshape(rows, dim)
    expected = np.array([d["embedding"] for d in json.loads(as_json)["data"]], dtype=np.float32)
    assert (rows, dim) == (7, 384) and np.array_equal(matrix, expected)
    status, health = _get(url + "/health")
    assert status == 200 and json.loads(health)["status"] == "ok"
    status, metrics = _get(url + "/metrics")
    text = metrics.decode()
    assert status == 200 and 'hpcembed_requests_total{code="200"}' in text
    assert 'hpcembed_request_seconds_count{lane="interactive"}' in text and "hpcembed_queue_tokens" in text
    # Where the requests' time went, each stage timed for every answered request.
    for stage in ("read+parse", "embed", "answer"):
        count = re.search(rf'hpcembed_stage_seconds_count{{lane="interactive",stage="{re.escape(stage)}"}} (\S+)', text)
        assert count and float(count.group(1)) >= 1, stage
    # The event loop's lateness is sampled all the time; full collections are counted (none need have happened).
    lag = re.search(r'hpcembed_event_loop_lag_seconds_count (\S+)', text)
    assert lag and float(lag.group(1)) >= 1
    assert "# TYPE hpcembed_gc_pause_seconds histogram" in text


BAD_REQUESTS = [
    (b"{not json", 400, "not JSON"),
    (b'\xff\xfe{"input": "a"}', 400, "not UTF-8"),
    (b'["a list"]', 400, "must be a JSON object"),
    ({"input": "a"}, 400, "'model' is required"),
    ({"model": "nope", "input": "a"}, 404, "is not served here"),
    ({"model": "@", "input": []}, 400, "'input' is empty"),
    ({"model": "@"}, 400, "'input' is required"),
    ({"model": "@", "input": ""}, 400, "input[0] is an empty string"),
    ({"model": "@", "input": ["ok"] * (MAX_TEXTS + 1)}, 400, f"over the limit of {MAX_TEXTS}"),
    ({"model": "@", "input": ["ok", "x" * (MAX_CHARS + 1)]}, 400, "input[1] has 20,001 characters"),
    ({"model": "@", "input": [1, "a"]}, 400, "not a mix"),
    ({"model": "@", "input": {"text": "a"}}, 400, "must be a string or a list"),
    ({"model": "@", "input": [[101, 3]]}, 200, ""),
    ({"model": "@", "input": [[101, 99_999_999]]}, 400, "outside the model's vocabulary"),
    ({"model": "@", "input": [list(range(1000, 1300))]}, 400, "this model takes at most 256"),
    ({"model": "@", "input": "a", "encoding_format": "int8"}, 400, "'encoding_format' must be"),
    ({"model": "@", "input": "a", "dimensions": 385}, 400, "'dimensions' must be an integer from 1 to 384"),
    ({"model": "@", "input": "a", "dimensions": True}, 400, "'dimensions' must be"),
    (b'{"model": "@", "input": "\\ud800 lone"}', 400, "input[0] is not Unicode text"),
]


def test_every_bad_request_gets_a_clear_4xx(server):
    url, name = server

    async def go():
        async with aiohttp.ClientSession() as session:
            out = []
            for body, _, _ in BAD_REQUESTS:
                body = body.replace(b"@", name.encode()) if isinstance(body, bytes) else \
                    {k: (name if v == "@" else v) for k, v in body.items()}
                out.append(await _post(session, url, body))
            out.append(await _post(session, url, {"model": name, "input": "a"}, {"X-Latency-Budget-Ms": "soon"}))
            return out
    answers = asyncio.run(go())
    for (body, status, message), (got, _, text) in zip(BAD_REQUESTS + [(None, 400, "X-Latency-Budget-Ms")],
                                                        answers):
        assert got == status, (body, got, text[:300])
        if status != 200:
            error = json.loads(text)["error"]
            assert message in error["message"] and error["type"] == "invalid_request_error", (body, error)


def test_interactive_lane_and_admission_control_under_bulk_load(server):
    """Bulk requests queue up; a one-text query meanwhile is answered before the bulk work is done; a query
    with a zero latency budget is refused at once with 429 and Retry-After; every bulk answer is what the same
    texts get alone."""
    url, name = server
    # Every request holds texts long enough (over 4,096 characters) for the tokenizer's long-text path while
    # other requests are tokenized at the same time; each answer must still be what its texts get alone.
    bulk = [[f"{BULK_TEXT * (20 if j % 8 == 0 else 1)} {k}-{j}" for j in range(MAX_TEXTS)] for k in range(6)]

    async def go():
        async with aiohttp.ClientSession() as session:
            finished: dict[str, float] = {}

            async def timed(key, body, headers=None):
                answer = await _post(session, url, body, headers)
                finished[key] = time.monotonic()
                return answer
            # A budget no machine misses: admission control is for the query, not the bulk load.
            loads = [asyncio.create_task(timed(f"bulk{k}", {"model": name, "input": texts},
                                               {"X-Latency-Budget-Ms": "600000"}))
                     for k, texts in enumerate(bulk)]
            await _bulk_queued(session, url, at_least=2)
            refused = await _post(session, url, {"model": name, "input": "now?"}, {"X-Latency-Budget-Ms": "0"})
            query = await timed("query", {"model": name, "input": "where do the ships go?"})
            bulk_answers = await asyncio.gather(*loads)
            alone = await _post(session, url, {"model": name, "input": bulk[3]})
            return refused, query, bulk_answers, alone, finished
    refused, query, bulk_answers, alone, finished = asyncio.run(go())
    assert refused[0] == 429 and int(refused[1]["Retry-After"]) >= 1, refused
    assert "over the latency budget" in json.loads(refused[2])["error"]["message"]
    assert query[0] == 200 and finished["query"] < max(v for k, v in finished.items() if k.startswith("bulk"))
    assert all(status == 200 for status, _, _ in bulk_answers), [(s, b[:200]) for s, _, b in bulk_answers]
    together = np.array([d["embedding"] for d in json.loads(bulk_answers[3][2])["data"]])
    by_itself = np.array([d["embedding"] for d in json.loads(alone[2])["data"]])
    assert together.shape == (MAX_TEXTS, 384) and np.abs(together - by_itself).max() < 1e-5


@pytest.mark.parametrize("ranks", [0, RANKS])
def test_sigterm_answers_accepted_requests_then_exits(tmp_path, model_dir, ranks):
    job, url = start_server(tmp_path, model_dir, ranks=ranks)
    # Under mpiexec, every rank is signalled, as Slurm's scancel does.
    pids = [job.rank_pid(r) for r in range(ranks)] if ranks else [job.proc.pid]
    try:
        _, name = url, json.loads(_get(url + "/health")[1])["model"]

        async def go():
            async with aiohttp.ClientSession() as session:
                loads = [asyncio.create_task(_post(session, url, {"model": name, "input": [BULK_TEXT] * MAX_TEXTS}))
                         for _ in range(4)]
                await asyncio.sleep(0.5)
                for pid in pids:
                    os.kill(pid, signal.SIGTERM)
                await asyncio.sleep(0.05)
                try:
                    late = (await _post(session, url, {"model": name, "input": "late"}))[0]
                except aiohttp.ClientConnectionError:
                    late = "refused"
                return await asyncio.gather(*loads), late
        answers, late = asyncio.run(go())
        assert [status for status, _, _ in answers] == [200] * 4
        assert all(len(json.loads(body)["data"]) == MAX_TEXTS for _, _, body in answers)
        assert late in (503, "refused")
        assert job.proc.wait(timeout=60) == 0
        assert "draining" in job.text() and "stopped" in job.text()
        # Each process says at its end how many full garbage collections it had (its start-up heap frozen).
        said = re.findall(r"(frontend|rank \d+ \((?:encoder|tokenizer)\)): (no full garbage collection|\d+ full)",
                          job.text())
        assert len(said) == (ranks or 1), job.text()[-2000:]
    finally:
        job.stop()


@pytest.mark.slow       # the full suite only (README): too long for CI's 30 minutes on two cores
def test_a_dead_tokenizing_process_is_answered_503_and_ends_the_server(tmp_path, model_dir):
    job, url = start_server(tmp_path, model_dir, "--tokenizer-processes", "1")
    try:
        name = json.loads(_get(url + "/health")[1])["model"]
        workers = [pid for pid in process_tree(job.proc.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)

        async def go():
            async with aiohttp.ClientSession() as session:
                return await _post(session, url, {"model": name, "input": [BULK_TEXT] * MAX_TEXTS})
        status, _, body = asyncio.run(go())
        assert status == 503 and "tokenizing process died" in json.loads(body)["error"]["message"]
        assert job.proc.wait(timeout=60) == 1
        assert "a tokenizing process died; ending the service" in job.text()
        assert "bulk requests tokenized in 1 process, " in job.text()
    finally:
        job.stop()


@pytest.mark.parametrize("dim", [384, 1024, 1])
def test_base64_rows_cut_from_one_encoding_equal_each_row_encoded(dim):
    from hpcembed.serve.server import _base64_rows
    rows = np.random.default_rng(dim).standard_normal((9, dim)).astype("<f4")
    assert _base64_rows(rows) == [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    assert _base64_rows(rows[:0]) == []


def test_serve_under_mpiexec_reports_a_mistake_once(tmp_path):
    """Every rank finds a missing model directory; rank 0 alone says so, and the world exits with its code."""
    proc = subprocess.run(["timeout", "120", MPIEXEC, "-n", str(RANKS), sys.executable, "-m", "hpcembed", "serve",
                           "--port", "0", "--model", str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=150, env={**os.environ, **MPI_ENV})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (proc.stdout + proc.stderr).count("does not exist") == 1, proc.stderr[-2000:]
