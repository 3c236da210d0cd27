#!/usr/bin/env bash
# Step time of the tiny model (512-token packed sequences) per parallel layout on this CPU (gloo).
#   bash benchmarks/cpu_layouts.sh            (from the repo root, after `make venv`)
set -eu
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
header=1
for layout in "1:" "2:parallel.tp=2 parallel.sequence_parallel=true" "2:parallel.cp=2" "2:parallel.pp=2" "4:parallel.tp=2 parallel.cp=2"; do
  n=${layout%%:*}; args=${layout#*:}
  out=$("$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/train_throughput.py --tiny --steps 5 $args 2>/dev/null | tail -2)
  if [ $header = 1 ]; then echo "$out" | head -1; header=0; fi
  echo "$out" | tail -1
done
