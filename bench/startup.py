"""Start-up of an `mpiexec hpcembed run` job, step by step, with rank 0's tokenizer probe started before the GPU
census and after it (HPCEMBED_EARLY_PROBE=0), alternating, on this machine.

    python -m bench.startup [--ranks 4] [--docs 600] [--repeats 3] [--slug cpu]

A small Parquet file of the benchmark corpus, embedded with the bundled model; `--gpu-tokens-per-s` makes the
rate plan run on a CPU box as it does on a GPU one. Each step is seconds from the encoder rank's process start
(the manifest's `startup`); the table gives each step's median over the repeats. Writes
bench/results/startup-<slug>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import record, table
from bench.corpus import DEFAULT_PARAGRAPHS, build_documents, write_parquet
from hpcembed.world import mpiexec_command

STEPS = ("building", "built", "plan_received", "first_batch")
VARIANTS = {"probe before the census": {}, "probe after the census (before)": {"HPCEMBED_EARLY_PROBE": "0"}}


def one_run(corpus: Path, out: Path, ranks: int, env: dict) -> dict[str, float]:
    cmd = [*mpiexec_command(ranks), sys.executable, "-m", "hpcembed", "run", "--input", str(corpus), "--output",
           str(out), "--gpu-tokens-per-s", "1e7", "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    if proc.returncode:
        raise SystemExit(f"hpcembed run failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "_manifest.json").read_text())
    [steps] = [r["startup"] for r in manifest["ranks"] if r["role"] == "encoder"]
    return {k: round(steps[k] - steps["process_started"], 3) for k in STEPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paragraphs", default=str(DEFAULT_PARAGRAPHS))
    ap.add_argument("--slug", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_parquet(build_documents(args.docs, Path(args.paragraphs)), Path(tmp) / "corpus")[0]
        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name, env in VARIANTS.items():
                runs[name].append(one_run(corpus, Path(tmp) / "out", args.ranks, env))
    medians = {name: {k: round(statistics.median(r[k] for r in rs), 3) for k in STEPS} for name, rs in runs.items()}
    print(table([(name, *(m[k] for k in STEPS)) for name, m in medians.items()], ("run", *STEPS)))
    out = record("startup", args.slug, {"ranks": args.ranks, "docs": args.docs, "repeats": args.repeats,
                                        "seconds_from_encoder_process_start": medians, "runs": runs,
                                        "baseline": "probe after the census (before)"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
