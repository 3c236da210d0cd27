"""Every attention kernel equals the CPU reference (forward and gradients), and the check sees the errors it
exists for.

Packed sequences of several uneven documents, split for context parallelism (CP=1, 2 and 4, every rank:
query chunks at offsets > 0 inside their documents), Llama-3-8B's head shapes (32 query heads, 8 KV heads,
head dim 128). The reference is the exact blockwise CPU kernel in float32 on the same bf16 inputs.
Tolerance: the start-up self-test's, 2e-2 of max |ref| (bf16 rounding; measured on the CPU at these shapes:
SDPA up to 0.009, the blockwise kernel up to 0.015); a masking or offset error is above 1.

Negative controls, on the same problem (CP=2, rank 1): a call aligned top-left (SDPA ``is_causal`` on
segments with more keys than queries: flash-attn < 2.1's convention) and the real kernel given keys one
position late must both be flagged, else the check itself is broken.

    python benchmarks/device_attention_check.py [--device cpu]   # prints DEVICE_ATTENTION_OK
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch
import torch.nn.functional as F

from megaprolong.model.attention import AttentionLayout, select_kernel
from megaprolong.model.attention.kernels import (HALF_PRECISION_TOLERANCE as TOLERANCE, expand_kv,
                                                 flash_attn_available, torch_varlen_available)
from megaprolong.model.context_parallel import gathered_positions, padded_lengths, partition_index

HEADS, GROUPS, DIM = 32, 8, 128
LENGTHS = [1500, 7, 333, 2900, 64, 1]  # uneven, some shorter than 2*CP


def errors(run, lengths, cp: int, rank: int, device: str, dtype=torch.bfloat16, layout_of=None,
           heads=HEADS, groups=GROUPS, dim=DIM) -> dict[str, float]:
    """``run(q, k, v, layout, scale)`` on ``device`` vs the CPU reference: max error / max |ref| of the output
    and the q, k, v gradients. ``layout_of(layout)`` may alter what ``run`` is given (negative controls)."""
    cu = np.concatenate([[0], np.cumsum(padded_lengths(np.array(lengths), cp))])
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(int(cu[-1]), heads, dim, generator=g).to(dtype)
    k, v = (torch.randn(int(cu[-1]), groups, dim, generator=g).to(dtype) for _ in range(2))
    rows = torch.from_numpy(partition_index(cu, cp, rank))
    gathered = [x[torch.from_numpy(gathered_positions(cu, cp))] for x in (k, v)]  # what the all-gather returns
    grad_out = torch.randn(len(rows), heads, dim, generator=g)
    cpu_blockwise = select_kernel("cpu-blockwise", "cpu", torch.float32).run
    results = {}
    for where, fn, dt, alter in (("ref", cpu_blockwise, torch.float32, None), ("got", run, dtype, layout_of)):
        dev = torch.device("cpu" if where == "ref" else device)
        layout = AttentionLayout.build(cu, cp, rank, dev)
        qd = q[rows].to(dev, dt, copy=True).requires_grad_()
        kd, vd = (x.to(dev, dt, copy=True).requires_grad_() for x in gathered)
        ks, vs = (x if layout.kv_index is None else x.index_select(0, layout.kv_index) for x in (kd, vd))
        out = fn(qd, ks, vs, alter(layout) if alter else layout, dim ** -0.5)
        (out.float() * grad_out.to(dev)).sum().backward()
        results[where] = [t.detach().float().cpu() for t in (out, qd.grad, kd.grad, vd.grad)]
    return {what: ((got - ref).abs().max() / ref.abs().max()).item()
            for what, ref, got in zip(("out", "dq", "dk", "dv"), results["ref"], results["got"])}


def top_left(q, k, v, layout, scale):
    """Negative control: every segment causal from its first key (top-left), as flash-attn < 2.1 did."""
    k, v = expand_kv(k, q.shape[1], 1), expand_kv(v, q.shape[1], 1)
    out = torch.empty_like(q)
    for qs, qe, ks, ke in zip(layout.cu_q[:-1], layout.cu_q[1:], layout.cu_k[:-1], layout.cu_k[1:]):
        qc, kc, vc = (x.transpose(0, 1)[None] for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
        out[qs:qe] = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)[0].transpose(0, 1)
    return out


def keys_one_late(layout: AttentionLayout) -> AttentionLayout:
    """Negative control: each segment with keys before its queries starts reading them one position late."""
    cu_k = layout.cu_k.copy()
    cu_k[:-1] += (np.diff(layout.cu_k) > np.diff(layout.cu_q)).astype(np.int64)
    dev = layout.cu_k_device.device
    return dataclasses.replace(layout, cu_k=cu_k, cu_k_device=torch.from_numpy(cu_k.astype(np.int32)).to(dev),
                               max_k=int(np.diff(cu_k).max()))


def negative_controls(kernel_run, device: str, dtype=torch.bfloat16, **shape) -> dict[str, float]:
    """The worst error of each deliberate mistake (each must exceed the tolerance)."""
    return {"top-left causal": max(errors(top_left, LENGTHS, 2, 1, device, dtype, **shape).values()),
            "keys one position late": max(errors(kernel_run, LENGTHS, 2, 1, device, dtype, keys_one_late,
                                                 **shape).values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    if a.device == "cuda":
        kernels = ["sdpa"] + (["torch-varlen"] if torch_varlen_available() else []) + \
            (["flash-attn"] if flash_attn_available() else [])
        print("torch", torch.__version__, torch.cuda.get_device_name(), "kernels:", ", ".join(kernels))
    else:
        kernels = ["cpu-blockwise", "sdpa"]
    failed = False
    for name in kernels:
        run = select_kernel(name, a.device, torch.bfloat16).run
        for cp in (1, 2, 4):
            worst = max(max(errors(run, LENGTHS, cp, r, a.device).values()) for r in range(cp))
            ok = worst <= TOLERANCE
            failed |= not ok
            print(f"RESULT kernel {name:<13} cp={cp}: max error {worst:.2e} of max |ref| (tolerance {TOLERANCE:.1e}) "
                  f"{'ok' if ok else 'MISMATCH'}", flush=True)
        for control, worst in negative_controls(run, a.device).items():
            flagged = worst > TOLERANCE
            failed |= not flagged
            print(f"RESULT negative control {name:<13} {control}: max error {worst:.2e} "
                  f"{'flagged' if flagged else 'NOT FLAGGED: the check cannot see this error'}", flush=True)
    if failed:
        sys.exit(1)
    print("DEVICE_ATTENTION_OK")


if __name__ == "__main__":
    main()
