"""The measured half of a scaling study on one machine (the H100 box): real runs at several scales, recorded
with `hpcembed scaling measure` into STUDY/measured.json. The simulation and the report run afterwards, anywhere:

    python -m bench.scaling_study --model M --paragraphs P --study scaling_results/h100-box
    hpcembed scaling measure --study scaling_results/h100-box --series h100-node \
        --from-e2e-bench bench/results/e2e_node-NVIDIA_H100_80GB_HBM3.json
    hpcembed scaling calibrate --output scaling_results/h100-box/calibration.json
    hpcembed scaling simulate --calibration .../calibration.json --measured .../measured.json --output ...
    hpcembed scaling report --study scaling_results/h100-box

Two series, both with the benchmark corpus (bench/corpus.py):
  - `vnodes-cpu`: weak scaling over 1, 2, 4 and 5 virtual nodes of one machine (HPCEMBED_VIRTUAL_NODES), each
    1 encoder rank encoding on one CPU core plus 2 tokenizer ranks, a fixed number of documents per node. Roles,
    links, routing and the conductor are those of N nodes; each node has its own cores.
  - `vnodes-h100`: weak scaling over 1..5 virtual nodes that share the H100, each 1 encoder rank (2 encoder
    instances on the shared GPU) plus 2 tokenizer ranks. Two tokenizer cores feed a fifth of an H100 at most, so
    each node is tokenizer-bound, as the real 1-GPU node is; units are many per tokenizer, so the run is long
    against start-up and the credit window.
  - `h100-tokenizers-K`: one node with the H100 and K tokenizer ranks (K = 4, 8): the GPU pipeline at rates the
    tokenizers limit, to check the simulation's model of it at more than the one point bench/e2e_node.py gives.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet


def measure(study: Path, series: str, scales: str, ranks_per_node: int, virtual: bool, run_args: list[str]) -> None:
    cmd = [sys.executable, "-m", "hpcembed", "scaling", "measure", "--study", str(study), "--series", series,
           "--scales", scales, "--ranks-per-node", str(ranks_per_node)]
    cmd += ["--virtual-nodes", "--tokenizers-per-node", str(ranks_per_node - 1)] if virtual else []
    start = time.perf_counter()
    if subprocess.run(cmd + ["--"] + run_args).returncode != 0:
        raise SystemExit(f"scaling_study: the {series} series failed (see above)")
    print(f"{series}: {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--study", required=True)
    ap.add_argument("--work", default="bench/work/scaling")
    ap.add_argument("--cpu-docs-per-node", type=int, default=1500)
    ap.add_argument("--cpu-scales", default="1,2,4,5")
    ap.add_argument("--gpu-tokenizers", default="4,8")
    ap.add_argument("--gpu-docs-per-tokenizer", type=int, default=100_000)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--h100-vnode-scales", default="", help="e.g. 1,2,3,4,5: run the vnodes-h100 series")
    ap.add_argument("--h100-vnode-docs-per-node", type=int, default=200_000)
    ap.add_argument("--h100-vnode-unit-rows", type=int, default=10_000)
    args = ap.parse_args()
    study, work = Path(args.study), Path(args.work)
    scales = [int(x) for x in args.cpu_scales.split(",")]
    tokenizers = [int(x) for x in args.gpu_tokenizers.split(",")] if args.gpu_tokenizers else []
    vscales = [int(x) for x in args.h100_vnode_scales.split(",")] if args.h100_vnode_scales else []
    most = max([0 if args.skip_cpu else args.cpu_docs_per_node * max(scales)]
               + [k * args.gpu_docs_per_tokenizer for k in tokenizers]
               + [n * args.h100_vnode_docs_per_node for n in vscales])
    start = time.perf_counter()
    docs = build_documents(most, Path(args.paragraphs))
    print(f"corpus: {len(docs):,} documents ({time.perf_counter() - start:.0f} s)", flush=True)
    common = ["--model", args.model, "--tokenizer-backend", "budtiktok"]
    if not args.skip_cpu:
        for n in scales:
            # Row groups of one unit: a Parquet unit is whole row groups, so larger groups would make larger units.
            write_parquet(docs[: n * args.cpu_docs_per_node], work / f"cpu-n{n}", files=n, row_group_size=100)
        measure(study, "vnodes-cpu", args.cpu_scales, 3, True,
                ["--input", str(work / "cpu-n{nodes}"), "--device", "cpu", "--unit-rows", "100",
                 "--chunk-rows", "50"] + common)
    if vscales:
        for n in vscales:
            write_parquet(docs[: n * args.h100_vnode_docs_per_node], work / f"h100v-n{n}", files=4 * n,
                          row_group_size=args.h100_vnode_unit_rows)
        measure(study, "vnodes-h100", args.h100_vnode_scales, 3, True,
                ["--input", str(work / "h100v-n{nodes}"), "--unit-rows", str(args.h100_vnode_unit_rows)] + common)
    for k in tokenizers:
        write_parquet(docs[: k * args.gpu_docs_per_tokenizer], work / f"gpu-t{k}", files=4 * k)
        measure(study, f"h100-tokenizers-{k}", "1", k + 1, False,
                ["--input", str(work / f"gpu-t{k}"), "--unit-rows", "20000"] + common)


if __name__ == "__main__":
    main()
