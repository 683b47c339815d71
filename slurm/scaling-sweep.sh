#!/bin/bash
# Submit the same embedding job at 1, 2, 4, ... nodes, one after another, and collect each run's manifest for the
# scaling harness.
#
#   slurm/scaling-sweep.sh JOB.toml SWEEP_DIR [hpcembed run options...]
#
# Environment:
#   HPCEMBED_SWEEP_NODES   node counts to run (default "1 2 4")
#   HPCEMBED_SWEEP_SBATCH  extra sbatch options for every run, e.g. "--gpus-per-node=8 --ntasks-per-node=64"
# Each run writes its embeddings to SWEEP_DIR/nodes-N/output (overwritten) and its manifest, with the sbatch job
# id, to SWEEP_DIR/manifests/nodes-N.json. Runs go one at a time, so none shares the file system with another.
set -euo pipefail
config=${1:?usage: scaling-sweep.sh JOB.toml SWEEP_DIR [hpcembed run options]}
sweep=${2:?usage: scaling-sweep.sh JOB.toml SWEEP_DIR [hpcembed run options]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$sweep/manifests"
for nodes in ${HPCEMBED_SWEEP_NODES:-1 2 4}; do
    run="$sweep/nodes-$nodes"
    rm -rf "$run/output"            # each size starts fresh; a requeued run of it still resumes its own output
    mkdir -p "$run"
    job=$(sbatch --parsable --wait --nodes="$nodes" --job-name="hpcembed-sweep-$nodes" \
        --output="$run/%x-%j.out" --error="$run/%x-%j.err" ${HPCEMBED_SWEEP_SBATCH:-} \
        "$here/embed-multi-node.sbatch" "$config" --output "$run/output" "$@") || {
        echo "scaling-sweep: the $nodes-node run failed; see $run" >&2; exit 1; }
    python3 - "$run/output/_manifest.json" "$sweep/manifests/nodes-$nodes.json" "$nodes" "${job%%;*}" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
manifest["sweep"] = {"nodes": int(sys.argv[3]), "slurm_job_id": sys.argv[4]}
json.dump(manifest, open(sys.argv[2], "w"), indent=2)
PY
    echo "scaling-sweep: $nodes node(s): $(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["texts_per_s"], "texts/s,", m["tokens_per_s"], "tokens/s")' "$run/output/_manifest.json")"
done
