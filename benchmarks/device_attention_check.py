"""On a GPU: every CUDA attention kernel equals the CPU reference (forward and gradients, bf16 tolerance).

Packed sequences of several uneven documents, split for context parallelism (CP=1, 2 and 4, every rank:
query chunks at offsets > 0 inside their documents), Llama-3-8B's head shapes (32 query heads, 8 KV heads,
head dim 128). The reference is the exact blockwise CPU kernel in float32 on the same bf16 inputs. Exits 1
on the first mismatch; prints DEVICE_ATTENTION_OK when all hold.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from megaprolong.model.attention import AttentionLayout, select_kernel
from megaprolong.model.attention.kernels import flash_attn_available, torch_varlen_available
from megaprolong.model.context_parallel import gathered_positions, padded_lengths, partition_index

HEADS, GROUPS, DIM = 32, 8, 128


def check(kernel_name: str, lengths: list[int], cp: int, rank: int) -> float:
    cu = np.concatenate([[0], np.cumsum(padded_lengths(np.array(lengths), cp))])
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(int(cu[-1]), HEADS, DIM, generator=g).bfloat16()
    k, v = (torch.randn(int(cu[-1]), GROUPS, DIM, generator=g).bfloat16() for _ in range(2))
    rows = torch.from_numpy(partition_index(cu, cp, rank))
    gathered = [x[torch.from_numpy(gathered_positions(cu, cp))] for x in (k, v)]  # what the all-gather returns
    grad_out = torch.randn(len(rows), HEADS, DIM, generator=g)
    results = {}
    for device, name, dtype in (("cpu", "cpu-blockwise", torch.float32), ("cuda", kernel_name, torch.bfloat16)):
        layout = AttentionLayout.build(cu, cp, rank, torch.device(device))
        qd = q[rows].to(device, dtype).requires_grad_()
        kd, vd = (x.to(device, dtype).requires_grad_() for x in gathered)
        ks, vs = (x if layout.kv_index is None else x.index_select(0, layout.kv_index) for x in (kd, vd))
        out = select_kernel(name, device, dtype).run(qd, ks, vs, layout, DIM ** -0.5)
        (out.float() * grad_out.to(device)).sum().backward()
        results[device] = [t.detach().float().cpu() for t in (out, qd.grad, kd.grad, vd.grad)]
    worst = 0.0
    for what, ref, got in zip(("out", "dq", "dk", "dv"), results["cpu"], results["cuda"]):
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        if err > 5e-2:  # bf16 rounding of P and of the output; a masking or offset error is O(1)
            print(f"MISMATCH {kernel_name} cp={cp} rank={rank} {what}: max error {err:.3e} of max |ref|")
            sys.exit(1)
    return worst


def main() -> None:
    assert torch.cuda.is_available(), "needs a GPU"
    kernels = ["sdpa"] + (["torch-varlen"] if torch_varlen_available() else []) + \
        (["flash-attn"] if flash_attn_available() else [])
    print("torch", torch.__version__, torch.cuda.get_device_name(), "kernels:", ", ".join(kernels))
    lengths = [1500, 7, 333, 2900, 64, 1]  # uneven, some shorter than 2*CP
    for name in kernels:
        for cp in (1, 2, 4):
            worst = max(check(name, lengths, cp, r) for r in range(cp))
            print(f"{name:<13} cp={cp}: out and grads within {worst:.2e} (relative to max) of the CPU reference")
    print("DEVICE_ATTENTION_OK")


if __name__ == "__main__":
    main()
