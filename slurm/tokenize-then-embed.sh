#!/bin/bash
# Tokenize on CPU nodes as one job, then embed the token directory on GPU nodes as a second job that starts only
# if the first succeeded (--dependency=afterok).
#
#   slurm/tokenize-then-embed.sh JOB.toml TOKDIR [hpcembed run options...]
#
# The job file's input, output and model are used by both steps; the first writes TOKDIR, the second reads it
# (`hpcembed run --input TOKDIR`, which refuses token shards made for another tokenizer). The extra options go to
# `hpcembed run`. Prints the two job ids. Environment:
#   HPCEMBED_TOKENIZE_SBATCH  sbatch options for the CPU job, e.g. "--partition=cpu --nodes=4 --ntasks-per-node=64"
#                             (default: 1 node, 8 tasks of 1 CPU, no GPU)
#   HPCEMBED_EMBED_SBATCH     sbatch options for the GPU job, e.g. "--partition=gpu --nodes=2"
#   HPCEMBED_EMBED_SCRIPT     the GPU job's script (default: embed-single-node.sbatch beside this one)
#   HPCEMBED_SRUN_ARGS        extra srun options for both, as in the other scripts
# Both jobs requeue themselves on USR1 near their time limit and resume (see slurm/README.md); the embedding job
# waits for the tokenize job whatever the number of requeues.
set -euo pipefail
config=${1:?usage: tokenize-then-embed.sh JOB.toml TOKDIR [hpcembed run options]}
tokdir=${2:?usage: tokenize-then-embed.sh JOB.toml TOKDIR [hpcembed run options]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
tokdir=$(mkdir -p "$tokdir" && cd "$tokdir" && pwd)
# printf %q keeps paths with spaces intact inside --wrap's shell line.
step="HPCEMBED_MPI=1 exec hpcembed launch -- srun --kill-on-bad-exit=1 ${HPCEMBED_SRUN_ARGS:-} hpcembed tokenize"
step+=" --config $(printf %q "$config") --output $(printf %q "$tokdir") --progress log"
tokenize=$(sbatch --parsable --job-name=hpcembed-tokenize --nodes=1 --ntasks-per-node=8 --cpus-per-task=1 \
    --output=%x-%j.out --error=%x-%j.err --open-mode=append --signal=B:USR1@120 --requeue \
    ${HPCEMBED_TOKENIZE_SBATCH:-} --wrap "$step")
tokenize=${tokenize%%;*}
echo "tokenize job: $tokenize"
embed=$(sbatch --parsable --dependency="afterok:$tokenize" --kill-on-invalid-dep=yes ${HPCEMBED_EMBED_SBATCH:-} \
    "${HPCEMBED_EMBED_SCRIPT:-$here/embed-single-node.sbatch}" "$config" --input "$tokdir" "$@")
echo "embed job: ${embed%%;*}"
