#!/usr/bin/env bash
# Preprocess raw corpora on several nodes: sbatch slurm/preprocess.sh
# One MPI rank per node tokenizes a contiguous run of the input files with --workers threads; rank 0 merges
# the parts into one PREFIX.bin/.idx (documents in input order). Settings (environment at submission):
#   INPUTS      the input files, space-separated (globs expanded here)            (required)
#   TOKENIZER   HF tokenizer directory or tokenizer.json                           (required)
#   OUTPUT      output prefix (PREFIX.bin / .idx / .json)                          (required)
#   PREPROCESS_ARGS  more flags, e.g. "--min-tokens 65536 --group-by repo"
#   REPO, PYTHON, CONTAINER, CONTAINER_MOUNTS as in slurm/_env.sh
#SBATCH --job-name=megaprolong-preprocess
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=64
#SBATCH --time=08:00:00
#SBATCH --output=logs/%x-%j.out
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
source "$REPO/slurm/_env.sh"
[ -n "${INPUTS:-}" ] || fail "INPUTS is not set (the input files)"
[ -n "${OUTPUT:-}" ] || fail "OUTPUT is not set (the output prefix)"
[ -e "${TOKENIZER:-/nonexistent}" ] || fail "tokenizer not found: TOKENIZER=${TOKENIZER:-}"
# shellcheck disable=SC2206
inputs=($INPUTS)
for f in "${inputs[@]}"; do [ -e "$f" ] || fail "input not found: $f"; done
cd "$REPO"
# shellcheck disable=SC2086
srun --mpi=pmix "${container[@]}" "$PYTHON" -m megaprolong.cli.preprocess --input "${inputs[@]}" \
  --tokenizer "$TOKENIZER" --output-prefix "$OUTPUT" --workers "${SLURM_CPUS_PER_TASK:-1}" ${PREPROCESS_ARGS:-}
