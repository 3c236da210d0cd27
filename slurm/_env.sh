# Sourced by every sbatch script: strict mode, the environment every script shares, a fail helper.
#   REPO             the megaprolong checkout (default: where sbatch was run)
#   PYTHON           python of the environment with megaprolong installed (default: python3)
#   CONTAINER        optional container image (pyxis: srun --container-image), CONTAINER_MOUNTS its mounts
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
PYTHON=${PYTHON:-python3}
CONTAINER=${CONTAINER:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REPO:$REPO}
fail() { echo "error: $*" >&2; exit 2; }
container=()
[ -n "$CONTAINER" ] && container=(--container-image="$CONTAINER" --container-mounts="$CONTAINER_MOUNTS")
true
