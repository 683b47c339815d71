"""One node end to end: `mpiexec hpcembed run` from Parquet files to Parquet files, beside the GPU stage alone and
sentence-transformers on the same corpus in the same run.

    python -m bench.e2e_node --model DIR --paragraphs PATH [--corpus standard|short] [--docs 2000000]
                             [--ranks 16] [--backends budtiktok hf] [--reference reference-fp32.npy]

Builds the corpus (bench/corpus.py: `standard` documents or `short` queries) as Parquet files, then runs the whole
job under mpiexec twice per tokenizer backend: first with an empty kernel cache (cold start-up), then with the
cache the first run filled (warm). Then times the GPU stage alone on the first --stage-docs rows (bench/gpu_stage.py,
the job's engine configuration, batches cut as the job's tokenizers cut them), sentence-transformers fp16 `encode`
(batch 256) as the baseline, and checks rows of the output against sentence-transformers fp32.

Rates: `texts_per_s` is files to files in steady state, from the moment the encoder ranks were ready (model loaded,
compiled, CUDA graphs captured) to the last commit; `texts_per_s_with_startup` divides by the whole mpiexec wall
time instead. `startup_seconds_*` is from launching mpiexec to the first batch handed to an encoder. `gpu_busy` is
the fraction of the steady-state time the encoder rank had a batch on the GPU. Writes
bench/results/e2e_node-<device>[-short].json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import device_name, record, table
from hpcembed.manifest import ranks_by_role
from hpcembed.world import mpiexec_command
from bench.corpus import CORPORA, DEFAULT_PARAGRAPHS, write_parquet

ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")     # a variant's word that sets the ranks' environment

REPO = Path(__file__).resolve().parents[1]


def run_job(args, corpus: Path, out: Path, backend: str, cache: Path, ranks: int = 0,
            options: tuple[str, ...] = (), environ: dict | None = None) -> tuple[dict, float, float, str]:
    """(manifest, wall seconds, epoch seconds at launch, stderr); `environ`: more environment for the ranks."""
    cmd = mpiexec_command(ranks or args.ranks) + [sys.executable, "-m", "hpcembed", "run", "--input", str(corpus),
                                         "--output", str(out), "--model", args.model, "--progress", "log",
                                         "--progress-interval", "5", "--unit-rows", str(args.unit_rows),
                                         "--tokenizer-backend", backend, "--cache-dir", str(cache),
                                         "--overwrite"] + args.extra + list(options)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HPCEMBED_MPI": "1", "PYTHONPATH": str(REPO), **(environ or {})}
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):     # the job's --cache-dir decides
        env.pop(name, None)
    # An earlier run's output is removed before the clock starts: --overwrite would delete it on rank 0 while
    # planning (0.6 s for 2M rows on the H100 box), a cost of reruns into one directory, not of embedding.
    shutil.rmtree(out, ignore_errors=True)
    launched = time.time()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
        raise SystemExit(f"hpcembed failed with exit {proc.returncode}")
    return json.loads((out / "_manifest.json").read_text()), wall, launched, proc.stderr


def summarize(manifest: dict, wall: float, launched: float, docs: int, world: int) -> dict:
    ranks = manifest["ranks"]
    roles: dict[str, int] = {}
    for r in ranks:
        roles[r["role"]] = roles.get(r["role"], 0) + 1
    if world > len(ranks):
        roles["idle"] = world - len(ranks)        # ranks the conductor's plan did not need report nothing
    steady = manifest["steady_seconds"]
    by_role = ranks_by_role(manifest)
    tok, gpu = by_role.get("tokenizer", []), by_role.get("encoder", [])
    first_batch = max(r["startup"]["first_batch"] for r in gpu)
    return {
        "texts_per_s": manifest["steady_texts_per_s"], "tokens_per_s": manifest["steady_tokens_per_s"],
        "texts_per_s_with_startup": round(docs / wall, 1), "wall_seconds": round(wall, 2),
        "steady_seconds": steady, "startup_seconds": round(first_batch - launched, 2),
        # From each encoder rank's process start (the manifest's own clock): plan, built, ready, first batch.
        "startup_steps_seconds": manifest.get("startup_seconds"),
        "conductor_startup_steps_seconds": manifest.get("conductor_startup_seconds"),
        # After the steady window: the last commit to mpiexec's exit (the manifest, _SUCCESS, MPI's finalize).
        "tail_seconds": round(wall - (first_batch - launched) - steady, 2),
        "build_seconds": [r.get("build_seconds") for r in gpu],
        "gpu_busy": manifest["gpu_busy"], "ranks": world,
        "roles": roles, "tokens": manifest["tokens"],
        # Where time goes: each role's busy time as a fraction of the steady-state window.
        "tokenizer_busy_mean": round(sum(r["busy_seconds"] for r in tok) / len(tok) / steady, 3) if tok else None,
        "tokenizer_tokens_per_s_per_rank": round(sum(r["tokens"] for r in tok) / steady / len(tok), 1) if tok
        else None,
        "gpu_instance_busy": [round(r["busy_seconds"] / steady / r.get("instances", 1), 3) for r in gpu],
        "gpu_loop_seconds": [r.get("loop_seconds") for r in gpu],
        "encoder_engine": [{k: r.get(k) for k in ("engine", "dtype", "attention", "fused_ops", "instances")}
                           for r in gpu],
        "encoder_host": [{k: r.get(k) for k in ("host_cpu_seconds", "batches", "host_ms_per_batch",
                                                "host_us_per_row")} for r in gpu],
        "tokenizer_other_seconds_mean": {
            k: round(sum(r.get("other_seconds", {}).get(k, 0.0) for r in tok) / len(tok), 3)
            for k in ("unit_wait", "credit_wait", "send", "read", "claim_wait", "finish", "untracked")}
        if tok else None,
        # The end of the work, in seconds from the first encoder rank being ready: the last tokenizer rank done,
        # the last batch encoded, the last shard written; and the encoder ranks' writer threads' busy seconds.
        "end_seconds": _end_seconds(tok, gpu),
        "tokenizer_backend": tok[0].get("tokenizer_backend") if tok else None,
        "hf_fallback_rows": sum(r.get("rows_hf_fallback", 0) for r in tok),
    }


def _end_seconds(tok: list[dict], gpu: list[dict]) -> dict | None:
    ready = min((r["ready_at"] for r in gpu if r.get("ready_at")), default=0.0)
    if not ready or not all(r.get("last_written_at") for r in gpu):
        return None
    return {"tokenizers_done": round(max(r.get("finished_at", 0.0) for r in tok) - ready, 3) if tok else None,
            "last_encoded": round(max(r["last_encoded_at"] for r in gpu) - ready, 3),
            "last_written": round(max(r["last_written_at"] for r in gpu) - ready, 3),
            "writer_seconds": [round(r.get("writer_seconds", 0.0), 3) for r in gpu]}


def stage(args, texts: list[str]) -> dict:
    """The GPU stage alone on the first rows of the corpus, in the job's engine configuration (fp16, fused ops,
    GELU epilogue, CUDA graphs, 2 instances, the CUDA token budget), in batches cut as the job's tokenizers cut
    them. (A longest-first re-batching of the same rows was also timed until the encoder batcher's rule for overdue
    rows, commit 2886e58, cut it into small batches that no job makes.)"""
    from bench.gpu_stage import assembled_batches, run_config
    from hpcembed.config import default_batch_tokens
    from hpcembed.engine import ModelSpec
    from hpcembed.cache import use_cache_dir
    use_cache_dir(str(Path(args.workdir or tempfile.gettempdir()) / "kernel-cache"))   # the jobs' kernels
    from hpcembed.tokenize import HFTokenizer
    spec = ModelSpec.load(args.model)
    tok = HFTokenizer.from_model_dir(spec.path, spec.max_seq_length, spec.lowercase)
    token_lists = tok.encode(texts)
    budget = default_batch_tokens("cuda")
    n_tokens = sum(len(t) for t in token_lists)
    out = {"rows": len(texts), "tokens": n_tokens, "passes": args.stage_passes,
           "config": f"varlen:fp16:{budget}:2:fused+epilogue+graphs"}
    flags = {"fused", "epilogue", "graphs"}
    for name, batches in (("assembled", assembled_batches(token_lists, budget, args.unit_rows)),):
        _, seconds, warmup, busy, graphed = run_config(spec, batches, len(texts), "varlen", "fp16", 2, flags, budget,
                                                       args.stage_passes)
        seconds /= args.stage_passes
        out[name] = {"batches": len(batches), "texts_per_s": round(len(texts) / seconds, 1),
                     "tokens_per_s": round(n_tokens / seconds, 1), "build_and_warmup_seconds": round(warmup, 2),
                     "graph_batch_fraction": round(graphed, 3)}
        print(f"GPU stage ({name} batches): {json.dumps(out[name])}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="standard")
    ap.add_argument("--reference", help="sentence-transformers fp32 embeddings of the first standard documents on "
                                        "the original fp32 weights (bench/device_prep.py)")
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--unit-rows", type=int, default=20_000)
    ap.add_argument("--ranks", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--backends", nargs="+", default=["budtiktok"])
    ap.add_argument("--starts", nargs="+", default=["cold", "warm"], choices=["cold", "warm"],
                    help="job runs per backend: cold empties the kernel cache first, warm keeps it")
    ap.add_argument("--stage-docs", type=int, default=200_000)
    ap.add_argument("--stage-passes", type=int, default=3)
    ap.add_argument("--baseline-docs", type=int, default=20_000)
    ap.add_argument("--check-docs", type=int, default=20_000, help="rows checked against sentence-transformers fp32")
    ap.add_argument("--timeout", type=int, default=480)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--variants", nargs="*", default=[], metavar="NAME:RANKS:OPTIONS",
                    help="warm runs after the others, each on RANKS ranks with these `hpcembed run` options "
                         "(space-separated, one argument; NAME=VALUE words set the ranks' environment), e.g. "
                         "'tok14:16:--tokenizer-ranks 14', 'probe-late:16:HPCEMBED_EARLY_PROBE=0'")
    ap.add_argument("extra", nargs="*", help="more `hpcembed run` options, after --")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="e2e_node-"))
    corpus_dir = work / f"corpus-{args.corpus}"
    build = CORPORA[args.corpus]
    start = time.perf_counter()
    stamp = corpus_dir / f".built-{args.docs}-{args.files}"
    head = max(args.baseline_docs, args.check_docs, args.stage_docs, 512)
    if stamp.exists():          # a warm machine keeps the corpus of an earlier run with the same shape
        docs = build(min(head, args.docs), Path(args.paragraphs))
    else:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        docs = build(args.docs, Path(args.paragraphs))
        write_parquet(docs, corpus_dir, files=args.files)
        stamp.touch()
        docs = docs[:head]
    print(f"corpus: {args.docs:,} {args.corpus} texts in {args.files} Parquet files "
          f"({time.perf_counter() - start:.1f} s)", flush=True)

    runs = {}
    cache = work / "kernel-cache"
    for backend in args.backends:
        for kind in args.starts:
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            out = work / f"out-{backend}"
            manifest, wall, launched, log = run_job(args, corpus_dir, out, backend, cache)
            print("\n".join(line for line in log.splitlines() if "plan:" in line or "role map" in line
                            or "complete:" in line), flush=True)
            name = f"{backend}-{kind}"
            runs[name] = {**summarize(manifest, wall, launched, args.docs, args.ranks), "start": kind, "out": out}
            print(f"{name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'out'})}", flush=True)

    for variant in args.variants:           # the kernel cache is warm from the runs above
        name, ranks, options = variant.split(":", 2)
        out = work / f"out-{name}"
        words = options.split()
        environ = dict(w.split("=", 1) for w in words if ENV_WORD.match(w))
        manifest, wall, launched, log = run_job(args, corpus_dir, out, args.backends[0], cache, int(ranks),
                                                tuple(w for w in words if not ENV_WORD.match(w)), environ)
        print("\n".join(line for line in log.splitlines() if "plan:" in line or "role map" in line
                        or "complete:" in line), flush=True)
        runs[name] = {**summarize(manifest, wall, launched, args.docs, int(ranks)), "start": "warm",
                      "options": options, "out": out}
        print(f"{name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'out'})}", flush=True)

    import torch
    if torch.cuda.is_available() and args.stage_docs:
        stage_result = stage(args, docs[: args.stage_docs])
    else:                       # on CPU (trying the script out), or not asked for: no GPU stage to compare with
        stage_result = {k: {"texts_per_s": float("nan"), "tokens_per_s": float("nan")} for k in ("assembled",)}
    from sentence_transformers import SentenceTransformer

    # The baseline, on the same GPU after the jobs: sentence-transformers fp16, batch 256, encode only.
    device = "cuda" if torch.cuda.is_available() else "cpu"      # cpu: only to try the script out
    st16 = SentenceTransformer(args.model, device=device)
    st16 = st16.half() if device == "cuda" else st16
    st16.encode(docs[:512], batch_size=256)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    st16.encode(docs[: args.baseline_docs], batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    sync()
    baseline = args.baseline_docs / (time.perf_counter() - t0)
    del st16

    # Correctness: the first check-docs rows of the last run of each backend against sentence-transformers fp32
    # (these weights), and, for the standard corpus, the first rows against fp32 on the original weights.
    import pyarrow.dataset as ds
    import pyarrow.compute as pc
    st32 = SentenceTransformer(args.model, device=device)
    check = docs[: args.check_docs]
    ref = st32.encode(check, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    original = np.load(args.reference) if args.reference and args.corpus == "standard" else None
    wanted = [f"doc-{k:09d}" for k in range(len(check))]
    for name, run in runs.items():
        out = run.pop("out")
        if name != f"{name.split('-')[0]}-{args.starts[-1]}":
            continue
        table_ = ds.dataset(str(out), format="parquet").to_table(filter=pc.field("id").isin(wanted))
        got = dict(zip(table_["id"].to_pylist(),
                       table_["embedding"].combine_chunks().flatten().to_numpy().reshape(table_.num_rows, -1)))
        emb = np.stack([got[i] for i in wanted])
        cos = np.sum(emb * ref, axis=1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        run["min_cosine"] = float(cos.min())
        run["rows_checked"] = len(wanted)
        if original is not None:
            run["min_cosine_vs_original_fp32"] = float(np.sum(emb[: len(original)] * original, axis=1).min())
    for run in runs.values():
        run["speedup_vs_baseline"] = round(run["texts_per_s"] / baseline, 2)

    stage_rate = stage_result["assembled"]["texts_per_s"]
    rows = [(name, f"{r['texts_per_s']:,.0f}", f"{r['tokens_per_s'] / 1e6:.2f}M",
             f"{r['texts_per_s'] / stage_rate:.1%}",
             f"{r['texts_per_s_with_startup']:,.0f}", f"{r['startup_seconds']:.1f}", f"{r['gpu_busy']:.1%}",
             r["roles"].get("tokenizer", 0), r["speedup_vs_baseline"], f"{r.get('min_cosine', float('nan')):.5f}")
            for name, r in runs.items()]
    for name in ("assembled",):
        rows.append((f"GPU stage alone, {name} batches", f"{stage_result[name]['texts_per_s']:,.0f}",
                     f"{stage_result[name]['tokens_per_s'] / 1e6:.2f}M", "", "", "", "", "", "", ""))
    rows.append(("sentence-transformers fp16 bs256", f"{baseline:,.0f}", "", "", "", "", "", "", 1.0, ""))
    print(table(rows, ("run", "texts/s", "tokens/s", "of stage", "texts/s incl. start-up", "start-up s", "gpu busy",
                       "tokenizer ranks", "x ST fp16", "min cos")))
    main_name = f"{args.backends[0]}-{args.starts[-1]}"
    main_run = runs[main_name]
    starts = {r["start"]: r["startup_seconds"] for name, r in runs.items() if name.startswith(args.backends[0])}
    slug = device_name().replace(" ", "_") + ("" if args.corpus == "standard" else f"-{args.corpus}")
    path = record("e2e_node", slug, {
        "corpus": args.corpus, "docs": args.docs, "files": args.files, "unit_rows": args.unit_rows,
        "mean_tokens": round(main_run["tokens"] / args.docs, 1),
        "texts_per_s": main_run["texts_per_s"], "tokens_per_s": main_run["tokens_per_s"],
        "stage_texts_per_s": stage_rate, "stage_tokens_per_s": stage_result["assembled"]["tokens_per_s"],
        "fraction_of_stage": round(main_run["texts_per_s"] / stage_rate, 3),
        "gpu_busy": main_run["gpu_busy"],
        "startup_seconds_cold": starts.get("cold"), "startup_seconds_warm": starts.get("warm"),
        "texts_per_s_with_startup": main_run["texts_per_s_with_startup"],
        "with_startup_fraction_of_steady": round(main_run["texts_per_s_with_startup"] / main_run["texts_per_s"], 3),
        "baseline_texts_per_s": round(baseline, 1), "baseline": "sentence-transformers fp16 encode, batch 256, "
        f"{args.baseline_docs} texts, same GPU, same run",
        "speedup_vs_baseline": main_run["speedup_vs_baseline"],
        "min_cosine": main_run["min_cosine"], "main_run": main_name,
        "ranks": args.ranks, "roles": main_run["roles"], "tokenizer_backend": args.backends[0],
        "stage": stage_result, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
