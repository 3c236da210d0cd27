# Shared by the torchrun sbatch scripts (training, SFT): rendezvous, NCCL settings, and a torchrun launch
# that turns Slurm's preemption signal into checkpoint + requeue. Settings, all overridable from the
# environment at submission (sbatch --export=ALL,VAR=value, or exported first), besides slurm/_env.sh's
# REPO, PYTHON, CONTAINER, CONTAINER_MOUNTS:
#   GPUS_PER_NODE  processes per node (default 8)
#   MASTER_PORT    rendezvous port on the first node (default 29500)
#   EXTRA_ARGS     more key=value overrides for the recipe, e.g. "train.steps=10 parallel.cp=4"
#   MAX_RESTARTS   restarts of the workers within the job when one dies (default 2): torchrun restarts them
#                  all, and they resume from the newest complete checkpoint
#   MAX_REQUEUES   requeues of the job once the restarts are spent (default 3)
#   PROGRESS_DIR   where the run records the step it is at (the checkpoint dir; set by the stage scripts)
# Preemption / time limit: Slurm sends USR1 (--signal=B:USR1@N) to the batch shell; it is forwarded to the
# worker processes, which checkpoint after the current step and exit; the job then requeues itself and the
# next run resumes from that checkpoint. A dead worker (GPU error, OOM, kill -9): torchrun restarts the
# workers (MAX_RESTARTS), then the job requeues (MAX_REQUEUES); a failure that repeats at the same step (a bad
# batch, a config error) stops the job with the reason instead.
source "$REPO/slurm/_env.sh"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}
MAX_RESTARTS=${MAX_RESTARTS:-2}
MAX_REQUEUES=${MAX_REQUEUES:-3}
PROGRESS_DIR=${PROGRESS_DIR:-}
NODES=${SLURM_NNODES:-1}

[ -f "${RECIPE:-}" ] || fail "recipe not found: RECIPE=${RECIPE:-}"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT
# Long context-parallel steps keep collectives waiting: generous timeouts, async error handling.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-1800}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# run_torchrun MODULE ARGS...: one torchrun per node running `python -m MODULE ARGS...` on every GPU.
run_torchrun() {
  local module=$1; shift
  echo "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $NODES node(s) x $GPUS_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT"
  echo "$module $*"
  requeue=0
  on_preempt() {
    echo "USR1: asking the training processes to checkpoint and exit"
    requeue=1
    # the workers (not torchrun, which USR1 would kill): torchrun starts them as 'python -u -m MODULE'
    srun --overlap --ntasks-per-node=1 -N "$NODES" pkill -USR1 -f -- "-u -m $module" || true
  }
  trap on_preempt USR1
  cd "$REPO"
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" \
    "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-0}" \
    -m "$module" "$@" &
  local pid=$! status=0
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" && status=0 || status=$?   # a trapped signal interrupts wait: wait again
  done
  if [ "$requeue" = 1 ]; then
    echo "checkpointed; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  [ "$status" = 0 ] && exit 0
  local why="" verdict=0  # the helper is standard-library Python: it runs on the batch host, container or not
  if [ -n "$PROGRESS_DIR" ]; then
    why=$(PYTHONPATH="$REPO" "$PYTHON" -m megaprolong.runtime.attempts "$PROGRESS_DIR") || verdict=$?
  fi
  if [ "$verdict" = 1 ]; then
    echo "error: $why" >&2
    exit "$status"
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "workers failed (exit $status) after $MAX_RESTARTS restarts; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "error: workers failed (exit $status); the job was requeued $MAX_REQUEUES times already: giving up" >&2
  exit "$status"
}
