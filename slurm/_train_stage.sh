# The body of the training sbatch scripts (prolong_64k.sh, prolong_512k.sh source it). Settings, all
# overridable from the environment at submission (sbatch --export=ALL,VAR=value or exported first):
#   REPO           the megaprolong checkout (default: where sbatch was run)
#   RECIPE         the recipe YAML                        (set by the calling script)
#   DATA_ROOT      folder of the indexed datasets the recipe's mix names (required unless the recipe has one)
#   CKPT_DIR       this run's checkpoints; a requeued job resumes from the newest complete one
#   INIT_CKPT      start the stage from this checkpoint (stage 1: the converted HF model; stage 2: stage 1's)
#   GPUS_PER_NODE  processes per node (default 8)
#   CONTAINER      optional container image (pyxis: srun --container-image), CONTAINER_MOUNTS its mounts
#   PYTHON         python of the environment with megaprolong installed (default: python3)
#   MASTER_PORT    rendezvous port on the first node (default 29500)
#   EXTRA_ARGS     more key=value overrides, e.g. "train.steps=10 parallel.cp=4"
# Preemption / time limit: Slurm sends USR1 (--signal=B:USR1@N) to this shell; it is forwarded to the
# training processes, which checkpoint after the current step and exit; the job then requeues itself.
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
DATA_ROOT=${DATA_ROOT:-}
CKPT_DIR=${CKPT_DIR:-$REPO/runs/${SLURM_JOB_NAME:-megaprolong}/ckpt}
INIT_CKPT=${INIT_CKPT:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CONTAINER=${CONTAINER:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$REPO:$REPO}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}
NODES=${SLURM_NNODES:-1}

fail() { echo "error: $*" >&2; exit 2; }
[ -f "$RECIPE" ] || fail "recipe not found: RECIPE=$RECIPE"
[ -z "$DATA_ROOT" ] || [ -d "$DATA_ROOT" ] || fail "data not found: DATA_ROOT=$DATA_ROOT"
[ -z "$INIT_CKPT" ] || [ -e "$INIT_CKPT" ] || fail "checkpoint not found: INIT_CKPT=$INIT_CKPT"
mkdir -p "$CKPT_DIR"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT
# Long context-parallel steps keep collectives waiting: generous timeouts, async error handling.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-1800}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(--config "$RECIPE" "checkpoint.dir=$CKPT_DIR" checkpoint.resume=auto)
[ -n "$DATA_ROOT" ] && args+=("data.root=$DATA_ROOT")
[ -n "$INIT_CKPT" ] && args+=("checkpoint.load=$INIT_CKPT")
# shellcheck disable=SC2206
args+=($EXTRA_ARGS)
container=()
[ -n "$CONTAINER" ] && container=(--container-image="$CONTAINER" --container-mounts="$CONTAINER_MOUNTS")

echo "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $NODES node(s) x $GPUS_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "recipe $RECIPE, checkpoints $CKPT_DIR"

requeue=0
on_preempt() {
  echo "USR1: asking the training processes to checkpoint and exit"
  requeue=1
  # the workers (not torchrun, which USR1 would kill): they run 'python -u -m megaprolong.train'
  srun --overlap --ntasks-per-node=1 -N "$NODES" pkill -USR1 -f -- '-u -m megaprolong.train' || true
}
trap on_preempt USR1

cd "$REPO"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" \
  "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-0}" \
  -m megaprolong.train "${args[@]}" &
pid=$!
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?   # a trapped signal interrupts wait: wait again
done
if [ "$requeue" = 1 ]; then
  echo "checkpointed; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
