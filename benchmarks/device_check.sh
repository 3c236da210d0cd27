#!/usr/bin/env bash
# The GPU check, run on a lent single-GPU machine (torch there; megatron-core carried as a wheel in .whl/):
# 1. the tiny parity run (3 optimizer steps, packed uneven documents) on the GPU equals the CPU run from
#    the same initial weights; 2. document-masking checks on the GPU; 3. training throughput at 64K.
set -uo pipefail
OUT=${OUT:-${TMPDIR:-/tmp}/megaprolong-device}; mkdir -p "$OUT"
SITE=${TMPDIR:-/tmp}/megaprolong-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__, torch.cuda.get_device_name())"
python3 -c "import transformer_engine" 2>/dev/null && echo "TE present" || echo "TE absent: our attention path"
python3 -c "import flash_attn" 2>/dev/null && echo "flash-attn present" || echo "flash-attn absent: SDPA per document chunk"
run() { python3 -m torch.distributed.run --standalone --nproc-per-node 1 "$@"; }
[ -n "${SKIP_PARITY:-}" ] || ( cd tests/workers && CUDA_VISIBLE_DEVICES= run parity.py "$OUT/cpu.pt" "$OUT/init.pt" && run parity.py "$OUT/gpu.pt" "$OUT/init.pt" ) 2>&1 | grep -v Warning | tail -5
[ -n "${SKIP_PARITY:-}" ] || python3 - "$OUT" <<'PY'
import sys, torch
d = sys.argv[1]; c = torch.load(f"{d}/cpu.pt"); g = torch.load(f"{d}/gpu.pt")
print("loss cpu", c["loss"], "\nloss gpu", g["loss"])
print("grad_norm cpu", c["grad_norm"], "\ngrad_norm gpu", g["grad_norm"])
rel = max(((g["grads"][k] - v).abs().max() / v.abs().max()).item() for k, v in c["grads"].items())
par = max((g["params"][k] - v).abs().max().item() for k, v in c["params"].items())
print(f"max relative grad difference {rel:.2e}; max parameter difference after 3 steps {par:.2e}")
PY
( cd tests/workers && run attention_checks.py ) 2>&1 | grep -E "OK|Error|rank0\]" | tail -8
for seq in 65536 131072; do
  run benchmarks/train_throughput.py --seq $seq --layers 16 --hidden 2048 --ffn 8192 --heads 32 --groups 8 \
    --vocab 32768 --steps 3 > "$OUT/tp_$seq.log" 2>&1; grep -E "rank0\]|tok/s|NVIDIA" "$OUT/tp_$seq.log" | tail -12
done
