"""Deduplication and reuse, one node end to end (issue 21): `mpiexec hpcembed run` on the standard corpus with
0%, 30% and 60% exact repeats, `--dedup on` against `--dedup off` in the same run; then an incremental rerun.

    python -m bench.dedup --model DIR --paragraphs PATH [--docs 2000000] [--parts repeats incremental]

repeats: for each fraction f, (1 - f) x docs distinct documents (bench/corpus.py, seed 0) and f x docs copies of
documents drawn from them at random (seed 21), shuffled over the Parquet files, each row under its own id. Each
corpus runs with --dedup off, then on; the rate compared is the steady one (files to files once the encoder ranks
are ready), and the whole mpiexec wall time is kept beside it.

incremental: the first docs distinct documents are embedded (--dedup on, no repeats: the full job); then every
20th row's text is changed and docs/50 new rows are added, and the changed corpus runs twice: a full recompute
(no --reuse) and with --reuse of the first output. Wall times, launch to exit, are compared.

Every job runs with a kernel cache a warm-up job filled, so start-up is the warm one. JSON: bench/results/
dedup-<device>.json, `benchmark: "dedup"`.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

from bench.common import device_name, record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet
from bench.e2e_node import run_job


def repeated(docs: list[str], n: int, fraction: float, seed: int = 21) -> list[str]:
    """n rows: the first (1 - fraction) x n documents once, the rest copies of them drawn at random, shuffled."""
    rng = random.Random(seed)
    distinct = docs[: n - int(fraction * n)]
    rows = distinct + [distinct[rng.randrange(len(distinct))] for _ in range(n - len(distinct))]
    rng.shuffle(rows)
    return rows


def changed(docs: list[str], n: int, extra: list[str]) -> list[str]:
    """The first n documents with every 20th changed (5%), and `extra` appended (new rows)."""
    return [d + " (revised)" if k % 20 == 0 else d for k, d in enumerate(docs[:n])] + extra


def job(args, corpus: Path, out: Path, cache: Path, *options: str) -> dict:
    run_args = argparse.Namespace(ranks=args.ranks, model=args.model, unit_rows=args.unit_rows, timeout=args.timeout,
                                  extra=list(options))
    manifest, wall, _, _ = run_job(run_args, corpus, out, args.backend, cache)
    return {"texts_per_s": manifest["steady_texts_per_s"], "wall_seconds": round(wall, 2),
            "steady_seconds": manifest["steady_seconds"], "gpu_busy": manifest.get("gpu_busy"),
            "tokens": manifest["tokens"], "rows": manifest["rows_written"],
            "rows_deduplicated": manifest.get("rows_deduplicated"), "rows_reused": manifest.get("rows_reused"),
            "startup_seconds": manifest.get("startup_seconds"),
            "tokenizer_seconds_mean": {k: _mean_other(manifest, k) for k in
                                       ("busy", "unit_wait", "credit_wait", "send", "read", "claim_wait", "finish",
                                        "untracked")},
            "encoder_loop_seconds": _of(manifest, "encoder", "loop_seconds"),
            "encoder_loop_cpu_seconds": _of(manifest, "encoder", "loop_cpu_seconds"),
            "encoder_dedup_seconds": _of(manifest, "encoder", "dedup_seconds"),
            "read_ahead_rows": _of(manifest, "tokenizer", "read_ahead_rows"),
            "tokenizers_after_ready_seconds": _after_ready(manifest), **_ends(manifest)}


def _ends(manifest: dict) -> dict:
    """The steady window's end (the last commit) against the last batch encoded, the last part complete and the
    last shard written, in seconds from the first encoder rank's being ready (the tail the GPU idles through), and
    the writer threads' seconds."""
    enc = [r for r in manifest["ranks"] if r["role"] == "encoder" and r.get("ready_at")]
    if not enc:
        return {}
    ready = min(r["ready_at"] for r in enc)
    return {"last_encoded_after_ready": round(max(r["last_encoded_at"] for r in enc) - ready, 3),
            "last_completed_after_ready": round(max(r["last_completed_at"] for r in enc) - ready, 3),
            "writer_seconds": round(sum(r["writer_seconds"] for r in enc), 3),
            "last_written_after_ready": round(max(r["last_written_at"] for r in enc) - ready, 3)}


def _of(manifest: dict, role: str, key: str) -> list:
    return [r.get(key) for r in manifest["ranks"] if r["role"] == role]


def _after_ready(manifest: dict) -> dict | None:
    """When the tokenizer ranks started asking for work, got their first credit, their first claim's answer, cut
    their first batch and had it taken in, against the first encoder rank's being ready (seconds, earliest and
    latest rank)."""
    ready = min((r["ready_at"] for r in manifest["ranks"] if r["role"] == "encoder" and r.get("ready_at")),
                default=None)
    tok = [r for r in manifest["ranks"] if r["role"] == "tokenizer"]
    if ready is None or not tok:
        return None
    span = {}
    for key in ("started_at", "granted_at", "first_answer_at", "first_formed_at", "first_sent_at"):
        at = [r[key] - ready for r in tok if r.get(key)]
        span[key] = [round(min(at), 3), round(max(at), 3)] if at else None
    return span


def _mean_other(manifest: dict, key: str) -> float | None:
    tok = [r for r in manifest["ranks"] if r["role"] == "tokenizer"]
    seconds = [r["busy_seconds"] if key == "busy" else r.get("other_seconds", {}).get(key, 0.0) for r in tok]
    return round(sum(seconds) / len(seconds), 3) if tok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--docs", type=int, default=2_000_000)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    ap.add_argument("--parts", nargs="+", default=["repeats", "incremental"], choices=["repeats", "incremental"])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--warmup-docs", type=int, default=20_000)
    ap.add_argument("--unit-rows", type=int, default=20_000)
    ap.add_argument("--ranks", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--backend", default="budtiktok")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--slug", default="", help="result file suffix (default: the device name)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hpcembed-dedup-"))
    cache = work / "cache"
    extra = args.docs // 50
    docs = build_documents(args.docs + extra, Path(args.paragraphs))
    warm = work / "warm"
    write_parquet(docs[: args.warmup_docs], warm, files=2)
    job(args, warm, work / "warm-out", cache)                  # fills the kernel cache
    slug = args.slug or device_name().replace(" ", "_")
    result: dict = {"docs": args.docs, "ranks": args.ranks, "backend": args.backend, "unit_rows": args.unit_rows}
    rows = []
    if "repeats" in args.parts:
        result["repeats"] = {}
        for fraction in args.fractions:
            corpus = work / f"repeats-{fraction}"
            write_parquet(repeated(docs, args.docs, fraction), corpus, files=args.files)
            off = job(args, corpus, work / "out", cache, "--dedup", "off")
            on = job(args, corpus, work / "out", cache, "--dedup", "on")
            entry = {"off": off, "on": on, "speedup": round(on["texts_per_s"] / off["texts_per_s"], 3),
                     "wall_speedup": round(off["wall_seconds"] / on["wall_seconds"], 3)}
            result["repeats"][str(fraction)] = entry
            rows.append((f"{fraction:.0%} repeats", f"{off['texts_per_s']:,.0f}", f"{on['texts_per_s']:,.0f}",
                         f"{entry['speedup']:.3f}x", f"{off['wall_seconds']:.1f} / {on['wall_seconds']:.1f}"))
            record("dedup", slug, result)           # kept as each corpus finishes: a cut-off run keeps its part
            print(rows[-1], flush=True)
            shutil.rmtree(corpus)
    if "incremental" in args.parts:
        v1, v2 = work / "v1", work / "v2"
        write_parquet(docs[: args.docs], v1, files=args.files)
        write_parquet(changed(docs, args.docs, docs[args.docs: args.docs + extra]), v2, files=args.files)
        first = job(args, v1, work / "v1-out", cache, "--dedup", "on")
        full = job(args, v2, work / "v2-full", cache, "--dedup", "on")
        reuse = job(args, v2, work / "v2-reuse", cache, "--dedup", "on", "--reuse", str(work / "v1-out"))
        result["incremental"] = {"first": first, "full_recompute": full, "reuse": reuse,
                                 "wall_speedup": round(full["wall_seconds"] / reuse["wall_seconds"], 3)}
        rows.append(("5% changed, +2%: full / --reuse", "", "", f"{result['incremental']['wall_speedup']:.2f}x",
                     f"{full['wall_seconds']:.1f} / {reuse['wall_seconds']:.1f}"))
    print(table(rows, ("corpus", "off texts/s", "on texts/s", "speedup", "wall s off / on")))
    print("wrote", record("dedup", slug, result))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
