"""One attention layer, forward + backward, per kernel, side by side: time and peak memory of a CP rank's
share of a sequence that is one long document (the worst case: every query chunk sits inside it).

Each (kernel, case) runs in a fresh process, so the peak memory is its own: on the CPU the peak RSS above
the RSS once q/k/v exist; on a GPU ``torch.cuda.max_memory_allocated`` above the inputs. A rank's share is
emulated on one device: its zigzag query chunks and the keys/values that the CP all-gather would give it.
``legacy`` is the per-document SDPA loop this project used before (a dense chunk x prefix boolean mask for
every chunk at an offset), kept here only as the baseline.

    .venv/bin/python benchmarks/attention.py                   # CPU: tiny heads (2 x 16, one KV head)
    python benchmarks/attention.py --heads 32 --groups 8 --head-dim 128   # GPU: Llama-3-8B's attention
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

CASES = "8192:2,32768:2,65536:2,131072:2,524288:8"  # sequence:cp


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def legacy_sdpa_loop(q, k_global, v_global, chunks, scale):
    """The former per-document loop: a chunk at an offset built a dense [n, offset + n] mask."""
    heads = q.shape[1]
    k_global, v_global = (x.repeat_interleave(heads // x.shape[1], 1) for x in (k_global, v_global))
    out = torch.empty_like(q)
    for row, start, doc_start, n in chunks:
        qc = q[row:row + n].transpose(0, 1)[None]
        kc, vc = (x[doc_start:start + n].transpose(0, 1)[None] for x in (k_global, v_global))
        offset = start - doc_start
        if offset == 0:
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)
        else:
            mask = torch.arange(offset + n, device=q.device)[None, :] <= (offset + torch.arange(n, device=q.device))[:, None]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
        out[row:row + n] = o[0].transpose(0, 1)
    return out


def measure_one(kernel: str, seq: int, cp: int, heads: int, groups: int, dim: int, device: str,
                warmup: bool | None = None) -> dict:
    """Forward + backward of one layer's attention for rank 0 of ``cp`` on a one-document sequence, after
    a warm-up forward + backward (default: on a GPU)."""
    from megaprolong.model.attention import AttentionLayout, select_kernel
    from megaprolong.model.context_parallel import gathered_positions

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cu = np.array([0, seq])
    layout = AttentionLayout.build(cu, cp, 0, dev)
    local = int(layout.cu_q[-1])
    g = torch.Generator(device=dev).manual_seed(0)
    make = lambda t, h: torch.randn(t, h, dim, generator=g, device=dev, dtype=dtype).requires_grad_()  # noqa: E731
    q, k_global, v_global = make(local, heads), make(seq, groups), make(seq, groups)
    scale = dim ** -0.5
    if kernel == "legacy":
        c = seq // (2 * cp) if cp > 1 else seq
        chunks = [(0, 0, 0, c)] if cp == 1 else [(0, 0, 0, c), (c, (2 * cp - 1) * c, 0, c)]
        step = lambda: legacy_sdpa_loop(q, k_global, v_global, chunks, scale)  # noqa: E731
        name = "legacy"
    else:
        chosen = select_kernel(kernel, dev.type, dtype)
        rows = torch.from_numpy(gathered_positions(cu, cp)).to(dev)

        def step():  # each call builds its own graph from the leaves: warm-up and timed backward are separate
            gathered = [x[rows] for x in (k_global, v_global)]  # what the all-gather returns: rank-major
            k, v = (x if layout.kv_index is None else x.index_select(0, layout.kv_index) for x in gathered)
            return chosen.run(q, k, v, layout, scale)
        name = chosen.name
    if warmup if warmup is not None else dev.type == "cuda":
        step().float().sum().backward()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    step().float().sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"kernel": name, "seq": seq, "cp": cp, "local_queries": local, "time_s": time.perf_counter() - start,
            "peak_bytes": max(peak, 0)}


def legacy_mask_bytes(seq: int, cp: int) -> int:
    """The largest dense mask of the legacy loop (boolean; SDPA turns it into a float bias besides)."""
    c = seq // (2 * cp)
    return 0 if cp == 1 else c * seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kernels", default=None, help="comma-separated (default: auto plus the others that run here, "
                                                    "and legacy)")
    ap.add_argument("--cases", default=CASES, help="comma-separated SEQ:CP (default %(default)s)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=1, help="KV heads")
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--memory-budget-gb", type=float, default=16.0,
                    help="skip legacy cases whose dense mask (x5 with its float bias) would exceed this")
    ap.add_argument("--one", nargs=3, metavar=("KERNEL", "SEQ", "CP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kernel, seq, cp = a.one[0], int(a.one[1]), int(a.one[2])
        print(json.dumps(measure_one(kernel, seq, cp, a.heads, a.groups, a.head_dim, a.device)))
        return
    kernels = a.kernels.split(",") if a.kernels else (
        ["torch-varlen", "sdpa", "legacy"] if a.device == "cuda" else ["cpu-blockwise", "legacy"])
    print(f"attention forward+backward, one layer, {a.heads} heads x {a.head_dim} ({a.groups} KV), one document "
          f"per sequence, device {a.device}; a CP rank's share (rank 0)")
    print(f"{'seq':>8} {'cp':>3} {'queries/rank':>12} {'kernel':<14} {'time s':>9} {'peak MiB':>10}")
    for case in a.cases.split(","):
        seq, cp = map(int, case.split(":"))
        for kernel in kernels:
            mask = legacy_mask_bytes(seq, cp)
            if kernel == "legacy" and a.device == "cpu" and 5 * mask > a.memory_budget_gb * 2**30:
                print(f"{seq:>8} {cp:>3} {seq // cp:>12} {'legacy':<14} {'not run: its ' + f'{mask / 2**30:.0f} GiB mask (x5 as a float bias)':>20}")
                continue
            cmd = [sys.executable, __file__, "--one", kernel, str(seq), str(cp), "--device", a.device,
                   "--heads", str(a.heads), "--groups", str(a.groups), "--head-dim", str(a.head_dim)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{seq:>8} {cp:>3} {seq // cp:>12} {kernel:<14} failed: {last[:80]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{seq:>8} {cp:>3} {r['local_queries']:>12} {r['kernel']:<14} {r['time_s']:>9.2f} "
                  f"{r['peak_bytes'] / 2**20:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
