#!/usr/bin/env bash
# One of megaprolong-pipeline's steps that is neither training nor SFT nor evaluation (generating the tiny
# data, preprocessing a data set, a conversion), as a one-task job: megaprolong-pipeline submit sends it
# with PIPELINE (the YAML), ROOT and STEP set. Exit 2: the step's input is wrong (not requeued).
#SBATCH --job-name=megaprolong-step
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
source "$REPO/slurm/_env.sh"
[ -f "${PIPELINE:-}" ] || fail "PIPELINE is not a pipeline YAML: ${PIPELINE:-unset}"
[ -n "${STEP:-}" ] || fail "STEP is not set"
cd "$REPO"
echo "job ${SLURM_JOB_ID:-?}: pipeline step $STEP of $PIPELINE (root ${ROOT:-its own})"
srun "${container[@]}" "$PYTHON" -m megaprolong.pipeline step "$STEP" "$PIPELINE" ${ROOT:+--root "$ROOT"}
