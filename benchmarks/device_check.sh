#!/usr/bin/env bash
# The GPU check, on a lent single-GPU machine (its own torch; megatron-core carried as a wheel in .whl/:
#   pip download --no-deps -d .whl megatron-core==0.19.2   here, then carry .whl). Asserting, < 8 minutes:
# 1. every CUDA attention kernel (torch varlen, SDPA, flash-attn if installed) equals the CPU reference,
#    forward and gradients, bf16 tolerance, uneven documents, CP=1/2/4 offsets (device_attention_check.py);
# 2. the tiny parity run (3 optimizer steps) on the GPU equals the CPU run from the same weights; document
#    masking checks on the GPU; the SFT stage's varlen attention equals transformers' sdpa on a packed 64K
#    row (device_sft_attention_check.py);
# 3. a training step of Llama-3-8B-shaped layers at 64K and 128K, ProLong-like documents: tokens/s/GPU, model
#    TFLOPS/GPU, MFU against 989 TFLOPS dense bf16 (H100/H200), peak memory; torch varlen vs the per-document
#    SDPA loop (model.attention_kernel=sdpa) in the same run;
# 4. one attention layer of the 512K recipe's CP=8 per-rank share, and of 64K / 128K sequences.
# Writes everything under $OUT; exits non-zero at the first failed check.
set -euo pipefail
OUT=${OUT:-${TMPDIR:-/tmp}/megaprolong-device}; mkdir -p "$OUT"
SITE=${TMPDIR:-/tmp}/megaprolong-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__, torch.cuda.get_device_name())"
run() { python3 -m torch.distributed.run --standalone --nproc-per-node 1 "$@"; }

echo "== 1. attention kernels vs the CPU reference"
python3 benchmarks/device_attention_check.py 2>&1 | tee "$OUT/attention_check.log" | grep -v Warning
grep -q DEVICE_ATTENTION_OK "$OUT/attention_check.log"

echo "== 2. parity GPU = CPU (fp32), document masking on the GPU"
( cd tests/workers && CUDA_VISIBLE_DEVICES= run parity.py "$OUT/cpu.pt" "$OUT/init.pt" && run parity.py "$OUT/gpu.pt" "$OUT/init.pt" ) \
  > "$OUT/parity.log" 2>&1 || { tail -30 "$OUT/parity.log"; exit 1; }
python3 - "$OUT" <<'PY'
import sys, torch
d = sys.argv[1]; c = torch.load(f"{d}/cpu.pt"); g = torch.load(f"{d}/gpu.pt")
print("loss cpu", c["loss"], "\nloss gpu", g["loss"])
rel = max(((g["grads"][k] - v).abs().max() / v.abs().max()).item() for k, v in c["grads"].items())
par = max((g["params"][k] - v).abs().max().item() for k, v in c["params"].items())
print(f"max relative grad difference {rel:.2e}; max parameter difference after 3 steps {par:.2e}")
torch.testing.assert_close(torch.tensor(g["loss"]), torch.tensor(c["loss"]), rtol=1e-4, atol=0)
assert rel < 1e-3 and par < 1e-4, "GPU run differs from the CPU run"
PY
( cd tests/workers && run attention_checks.py ) > "$OUT/masking.log" 2>&1 || { tail -30 "$OUT/masking.log"; exit 1; }
grep -q ATTENTION_CHECKS_OK "$OUT/masking.log" && echo "document masking on the GPU: OK"

echo "== 2b. SFT attention without flash-attn: megaprolong_varlen = sdpa on a packed 64K bf16 row"
python3 benchmarks/device_sft_attention_check.py 2>&1 | tee "$OUT/sft_attention.log" | grep -v Warning
grep -q SFT_ATTENTION_OK "$OUT/sft_attention.log"

echo "== 3. Llama-3-8B-shaped layers, one GPU"
LAYERS=${LAYERS:-12}  # + the 128K-vocabulary embedding and LM head; fits 139 GiB at 128K with full recompute
for seq in 65536 131072; do
  for kernel in torch-varlen sdpa; do
    run benchmarks/train_throughput.py --seq $seq --layers "$LAYERS" --hidden 4096 --ffn 14336 --heads 32 \
      --groups 8 --vocab 128256 --mean-doc 16384 --steps 2 --json model.attention_kernel=$kernel \
      train.loss_chunk_tokens=8192 > "$OUT/step_${seq}_$kernel.log" 2>&1 || { tail -30 "$OUT/step_${seq}_$kernel.log"; exit 1; }
    grep "^{" "$OUT/step_${seq}_$kernel.log" | tail -1 | python3 -c "
import json, sys; r = json.loads(sys.stdin.read())
print(f\"seq {r['seq']:>6} {r['kernel']:<13} {r['tokens_per_s_per_gpu']:>9,.0f} tok/s/GPU {r['tflops_per_gpu']:>6.1f} TFLOPS/GPU \"
      f\"MFU {r['tflops_per_gpu'] / 989:.1%} peak {r['cuda_peak_gib']:.1f} GiB\")"
  done
done

echo "== 4. one attention layer (8B heads): 64K, 128K, and the 512K recipe's CP=8 per-rank share"
python3 benchmarks/attention.py --heads 32 --groups 8 --head-dim 128 --cases 65536:1,131072:1,524288:8 \
  --kernels torch-varlen,sdpa 2>&1 | tee "$OUT/attention_layer.log" | grep -v Warning
! grep -q failed "$OUT/attention_layer.log"
echo "DEVICE_CHECK_OK"
