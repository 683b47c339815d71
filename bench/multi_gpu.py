"""Per-GPU scaling on one node: the end-to-end job (Parquet to Parquet) with 1, 2, 4, 8 encoder ranks.

    python -m bench.multi_gpu --model DIR [--gpus 1 2 4 8] [--docs 1000000] [--cores-per-gpu N]
    python -m bench.multi_gpu --model DIR --share-gpu --gpus 1 2     # dry run: g encoder ranks on one GPU

Each count g runs `mpiexec -n g*cores_per_gpu hpcembed run` on the benchmark corpus (bench/corpus.py) with
CUDA_VISIBLE_DEVICES limited to the first g GPUs: one encoder rank per GPU with 2 instances, the rest of the ranks
tokenizer ranks as the conductor plans them. E(g) = X(g) / (g * X(1)) on steady-state texts/s (from the gpu
ranks' ready time to the last commit; see bench/e2e_node.py). Per-gpu busy time comes from the manifest.

--share-gpu is the dry run for boxes with one GPU: g encoder ranks share GPU 0 (`--tokenizer-ranks` sets the split),
which exercises the several-gpu-ranks-per-node paths (node-local rank -> device, the rate plan, shard naming) but
says nothing about scaling; its rows are labelled so. Writes bench/results/multi_gpu-<device>[-shared].json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import device_name, record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet
from bench.e2e_node import run_job, summarize
from hpcembed.manifest import ranks_by_role


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--unit-rows", type=int, default=20_000)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--cores-per-gpu", type=int, default=0, help="ranks per GPU (default: cores / GPUs)")
    ap.add_argument("--share-gpu", action="store_true", help="all encoder ranks on GPU 0 (dry run, not scaling)")
    ap.add_argument("--timeout", type=int, default=480)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    import torch
    visible = torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0))
    if not args.share_gpu and max(args.gpus) > visible:
        raise SystemExit(f"--gpus {max(args.gpus)} needs that many GPUs; this box has {visible} "
                         "(use --share-gpu for a dry run)")
    per_gpu = args.cores_per_gpu or (cores // max(args.gpus) if args.share_gpu else cores // max(visible, 1))

    work = Path(args.workdir or tempfile.mkdtemp(prefix="multi_gpu-"))
    stamp = work / "corpus" / f".built-{args.docs}-{args.files}"
    if not stamp.exists():
        shutil.rmtree(work / "corpus", ignore_errors=True)
        write_parquet(build_documents(args.docs, Path(args.paragraphs)), work / "corpus", files=args.files)
        stamp.touch()

    rows = []
    for g in args.gpus:
        ranks = per_gpu * g if not args.share_gpu else cores
        extra = ["--transport", "mpi"]
        env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
        if args.share_gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = "0"
            extra += ["--tokenizer-ranks", str(ranks - 1 - g)]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(g))
        job_args = argparse.Namespace(ranks=ranks, model=args.model, unit_rows=args.unit_rows, timeout=args.timeout,
                                      extra=extra)
        start = time.perf_counter()
        manifest, wall, launched, _ = run_job(job_args, work / "corpus", work / f"out-{g}", "auto", work / "cache")
        if env_before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
        s = summarize(manifest, wall, launched, args.docs, ranks)
        gpu_ranks = ranks_by_role(manifest).get("encoder", [])
        rows.append({"gpus": g, "gpu_ranks": len(gpu_ranks), "ranks": ranks,
                     "devices": sorted({r.get("device", "?") for r in gpu_ranks}),
                     "per_gpu_busy": [round(r["busy_seconds"] / s["steady_seconds"] / r.get("instances", 1), 3)
                                      for r in gpu_ranks],
                     # Goal 4 of issue 18: each encoder rank's host cost, which should not grow with ranks per node.
                     "host_us_per_row": [r.get("host_us_per_row") for r in gpu_ranks],
                     "host_ms_per_batch": [r.get("host_ms_per_batch") for r in gpu_ranks],
                     **s, "seconds": round(time.perf_counter() - start, 1)})
        print(f"g={g}: {s['texts_per_s']:,.0f} texts/s, gpu busy {s['gpu_busy']}, roles {s['roles']}", flush=True)
    base = rows[0]["texts_per_s"] / rows[0]["gpus"]
    for r in rows:
        r["efficiency"] = round(r["texts_per_s"] / (r["gpus"] * base), 3)
    print(table([(r["gpus"], r["ranks"], ",".join(r["devices"]), f"{r['texts_per_s']:,.0f}",
                  f"{r['tokens_per_s'] / 1e6:.2f}M", f"{r['gpu_busy']:.1%}", f"{r['efficiency']:.1%}") for r in rows],
                ("encoder ranks", "ranks", "devices", "texts/s", "tokens/s", "gpu busy", "E(g)")))
    slug = device_name().replace(" ", "_") + ("-shared" if args.share_gpu else "")
    path = record("multi_gpu", slug, {
        "kind": "dry run: encoder ranks sharing one GPU, not a scaling result" if args.share_gpu else "scaling",
        "docs": args.docs, "gpus": rows[-1]["gpus"], "efficiency": rows[-1]["efficiency"],
        "baseline": "the same job with 1 encoder rank, same run", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
