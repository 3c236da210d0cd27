# Shared by the torchrun sbatch scripts (training, SFT): start-up checks, a node check, the torchrun launch,
# and what happens when it ends. Settings, all overridable from the environment at submission (sbatch
# --export=ALL,VAR=value, or exported first), besides slurm/_env.sh's REPO, PYTHON, CONTAINER, CONTAINER_MOUNTS:
#   GPUS_PER_NODE  processes per node (default 8)
#   MASTER_PORT    rendezvous port on the first node (default 29500)
#   EXTRA_ARGS     more key=value overrides for the recipe, e.g. "train.steps=10 parallel.cp=4"
#   MAX_RESTARTS   restarts of the workers within the job when one dies (default 2): torchrun restarts them
#                  all, and they resume from the newest complete checkpoint
#   MAX_REQUEUES   failure requeues in a row without progress (default 3); preemption and time-limit
#                  requeues do not count, and the count restarts once the run gets past the failed step
#   NODE_CHECK     1 (default): check every node (GPUs visible, allocating, an all-reduce) before torchrun
#   USR1_GRACE     seconds after the time-limit warning (USR1) by which the job requeues itself, whatever the
#                  workers do (default 480: before Slurm's kill at the limit, with --signal=B:USR1@600)
#   TERM_GRACE     the same after SIGTERM (preemption), and torchrun's --shutdown-timeout (default 120;
#                  keep it below the site's GraceTime / KillWait; torch < 2.12's torchrun has a fixed 30 s)
#   PROGRESS_DIR   where the run keeps its records (the checkpoint dir; set by the stage scripts)
#   RUN_DIR        the run's folder (logs/ there: NCCL's flight records); default PROGRESS_DIR
#
# What a job survives on its own:
#   - time limit: Slurm's USR1 warning (--signal=B:USR1@600) -> STOP flag + USR1 to the workers, which
#     checkpoint after the current step and exit -> requeue (by USR1_GRACE at the latest)
#   - preemption: SIGTERM (Slurm's default) -> the same (TERM_GRACE); workers told by the STOP flag that the
#     SIGTERM torchrun forwards is a stop request, not a teardown
#   - a dead worker (GPU error, OOM, kill -9): torchrun restarts the workers (MAX_RESTARTS), then the job
#     requeues (MAX_REQUEUES failure requeues without progress)
#   - a hang: the step watchdog prints every thread's stack and exits the worker -> torchrun restarts
#   - a bad node: the node check names it, and the job is requeued without it (ExcNodeList)
# `scancel JOB` also sends TERM, but marks the job CANCELLED first: the run stops and is not requeued.
# What stops it, with the reason as the log's last line (a person is needed): bad input (config, data, no
# checkpoint that verifies: exit 2, found once by the start-up check, never retried); the same step failing
# in two attempts in a row (exit 3); MAX_REQUEUES spent; another job writing the same folder.
source "$REPO/slurm/_env.sh"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}
MAX_RESTARTS=${MAX_RESTARTS:-2}
MAX_REQUEUES=${MAX_REQUEUES:-3}
NODE_CHECK=${NODE_CHECK:-1}
USR1_GRACE=${USR1_GRACE:-480}
TERM_GRACE=${TERM_GRACE:-120}
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
  local job=${SLURM_JOB_ID:-0}
  echo "job $job restart ${SLURM_RESTART_COUNT:-0}: $NODES node(s) x $GPUS_PER_NODE, rendezvous $MASTER_ADDR:$MASTER_PORT"
  echo "$module $*"
  cd "$REPO"
  if [ -n "$PROGRESS_DIR" ]; then
    rm -f "$PROGRESS_DIR/STOP"  # an earlier allocation's stop request
    # NCCL's flight recorder: the last collectives of every rank, written to logs/ when one times out (the
    # TORCH_FR_* names are torch >= 2.7's; older torch reads TORCH_NCCL_TRACE_BUFFER_SIZE and
    # TORCH_NCCL_DEBUG_INFO_TEMP_FILE: export those instead)
    local logs=${RUN_DIR:-$PROGRESS_DIR}/logs
    mkdir -p "$logs"
    export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000} TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$logs/nccl_trace_job${job}_rank}
  fi

  # 1. Start-up checks, once, here: bad input fails in seconds, is never retried, and is the last line.
  local rc=0
  WORLD_SIZE=$((NODES * GPUS_PER_NODE)) RANK=0 LOCAL_RANK=0 on_batch_host "$PYTHON" -m "$module" --check "$@" || rc=$?
  if [ "$rc" != 0 ]; then
    echo "error: the start-up checks failed (exit $rc, above): not launching; fix the input, then resubmit" >&2
    exit "$rc"
  fi

  # 2. Every node: GPUs visible and working, an all-reduce across them.
  if [ "$NODE_CHECK" = 1 ]; then check_nodes; fi

  # 3. Train. USR1 (time-limit warning) and TERM (preemption) ask for a checkpoint, then a requeue. Slurm
  #    also sends TERM to torchrun, which passes it on: give the workers TERM_GRACE to finish (torchrun's
  #    --shutdown-timeout, read from the environment by torch >= 2.12; older torch gives a fixed 30 s, and
  #    rank 0 warns when TERM_GRACE asks for more).
  export PET_SHUTDOWN_TIMEOUT=$TERM_GRACE TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TERM_GRACE
  stop_signal="" deadline=""
  trap 'on_stop_signal USR1 "$module"' USR1
  trap 'on_stop_signal TERM "$module"' TERM
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${container[@]}" \
    "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE" \
    --max-restarts "$MAX_RESTARTS" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$job" \
    -m "$module" "$@" &
  local pid=$! status=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ -n "$deadline" ] && [ "$(date +%s)" -ge "$deadline" ]; then
      echo "the workers did not stop by the deadline after $stop_signal: requeueing job $job now"
      requeue_job
    fi
    sleep 1 & wait $! 2>/dev/null || true   # a trapped signal ends the wait at once
  done
  wait "$pid" && status=0 || status=$?
  trap - USR1 TERM
  if [ -n "$stop_signal" ]; then
    echo "stopped on $stop_signal (exit $status); requeueing job $job"
    requeue_job
  fi
  [ "$status" = 0 ] && exit 0
  failure_requeue "workers failed (exit $status) after $MAX_RESTARTS restart(s)" "$status"
}

# Run a command once on the batch host (inside the container when one is set).
on_batch_host() {
  if [ -n "$CONTAINER" ]; then
    srun --ntasks=1 --nodes=1 "${container[@]}" "$@"
  else
    "$@"
  fi
}

on_stop_signal() {  # on_stop_signal SIGNAL MODULE
  local sig=$1 module=$2 grace=$USR1_GRACE now
  [ "$sig" = TERM ] && grace=$TERM_GRACE
  now=$(date +%s)
  if [ -z "$deadline" ] || [ $((now + grace)) -lt "$deadline" ]; then deadline=$((now + grace)); fi
  [ -n "$stop_signal" ] && { echo "$sig: already stopping (deadline in $((deadline - now)) s)"; return; }
  stop_signal=$sig
  if [ "$sig" = TERM ] && job_cancelled; then
    echo "TERM: job $SLURM_JOB_ID was cancelled (scancel); the training processes stop, and it is not requeued"
    return
  fi
  echo "$sig: asking the training processes to checkpoint and exit (requeue in at most $grace s)"
  if [ -n "$PROGRESS_DIR" ]; then  # for workers not started yet, or restarted: they stop at their first step
    printf '{"run": "%s.%s", "reason": "%s to the batch shell", "time": %s}\n' "${SLURM_JOB_ID:-0}" \
      "${SLURM_RESTART_COUNT:-0}" "$sig" "$now" > "$PROGRESS_DIR/.STOP.tmp" && mv -f "$PROGRESS_DIR/.STOP.tmp" "$PROGRESS_DIR/STOP"
  fi
  # the workers (not torchrun, which USR1 would kill): torchrun starts them as 'python -u -m MODULE'
  srun --overlap --ntasks-per-node=1 -N "$NODES" pkill -USR1 -f -- "-u -m $module" || true
}

# scancel sends TERM too: that is a person stopping the run, and requeueing would bring it back. Slurm
# shows a cancelled job as COMPLETING (as it does one preempted without grace time), but slurmstepd writes
# "*** JOB N ON HOST CANCELLED AT TIME ***" to the job's log before the signal, with " DUE TO PREEMPTION"
# (or TIME LIMIT, NODE FAILURE) when it is not a person. When unsure, it is not a cancel: requeue.
job_cancelled() {
  local info log
  info=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || return 1
  case "$info" in *JobState=CANCELLED*) return 0 ;; *JobState=COMPLETING*) ;; *) return 1 ;; esac
  log=$(grep -o 'StdErr=[^ ]*' <<<"$info") && log=${log#StdErr=}
  [ -r "$log" ] && grep -q "\*\*\* JOB $SLURM_JOB_ID ON [^ ]* CANCELLED AT [^ ]* \*\*\*" "$log"
}

requeue_job() {
  if job_cancelled; then
    echo "job $SLURM_JOB_ID was cancelled (scancel): not requeueing"
    exit 0
  fi
  scontrol requeue "$SLURM_JOB_ID" || echo "warning: scontrol requeue $SLURM_JOB_ID failed (already requeued by Slurm?)"
  exit 0
}

# failure_requeue WHY STATUS: requeue after a failure if the run's record allows it, else stop for good.
failure_requeue() {
  local why=$1 status=$2 verdict="" allowed=0
  if [ -n "$PROGRESS_DIR" ]; then  # the helper is standard-library Python: it runs on the batch host, container or not
    verdict=$(PYTHONPATH="$REPO" "$PYTHON" -m megaprolong.runtime.attempts "$PROGRESS_DIR" --requeue "$MAX_REQUEUES") || allowed=$?
  elif [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    allowed=1 verdict="requeued $MAX_REQUEUES times already"
  fi
  if [ "$allowed" != 0 ]; then
    echo "error: $why; $verdict" >&2
    exit "$status"
  fi
  echo "$why; $verdict: requeueing job $SLURM_JOB_ID"
  requeue_job
}

# The node check on every node; the nodes that did not report ok are named, and the job is requeued
# without them (ExcNodeList can only change while a job is pending: hold it, exclude, release).
check_nodes() {
  local out rc=0 ok bad="" host
  out=$(srun --ntasks-per-node=1 -N "$NODES" --kill-on-bad-exit=0 "${container[@]}" \
        "$PYTHON" -m megaprolong.runtime.node_check 2>&1) || rc=$?
  echo "$out" | grep -E '^node_check:' || true
  ok=$(echo "$out" | sed -n 's/^node_check: \([^ ]*\) ok .*/\1/p')
  for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    echo "$ok" | grep -qx "${host%%.*}" || bad="$bad${bad:+,}$host"
  done
  if [ -z "$bad" ] && [ "$rc" = 0 ]; then return 0; fi
  [ -n "$bad" ] || { echo "error: the node check failed (srun exit $rc) without naming a node:" >&2; echo "$out" >&2; }
  echo "error: node check failed on: ${bad:-?}; not training there" >&2
  if [ -n "$bad" ]; then
    trap '' TERM  # requeuehold signals this script: not a preemption
    local excluded
    excluded=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p')
    [ -n "$excluded" ] && [ "$excluded" != "(null)" ] && bad="$excluded,$bad"
    if scontrol requeuehold "$SLURM_JOB_ID" && scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$bad" \
        && scontrol release "$SLURM_JOB_ID"; then
      echo "job $SLURM_JOB_ID requeued with ExcNodeList=$bad"
      exit 0
    fi
    echo "error: could not requeue job $SLURM_JOB_ID without $bad; resubmit with --exclude=$bad" >&2
    exit 1
  fi
  failure_requeue "the node check failed" 1
}
