"""Whole-step scaling with the sequence length under context parallelism, on this CPU (gloo).

A tiny model whose activations, not its imports, dominate (1 layer, hidden 64, 4 heads, 2 KV heads, the loss
chunked, full recomputation), one document as long as the sequence, one step per launch of
``benchmarks/train_throughput.py``. "step memory" is the peak RSS per rank minus the same layout's at a
1K-token sequence, so imports, weights and the loss chunk are not counted; "CPU s" is user + sys of the
step summed over all ranks.

Peak RSS depends on the C allocator as much as on the program: glibc raises its mmap threshold to the size
of the first large block freed, after which freed activations stay in the heap and the peak records that
retention (it varied by 0.05 GB per rank between identical runs). By default the runs fix the threshold
(``MALLOC_MMAP_THRESHOLD_=131072``: large blocks are mapped and go back to the OS when freed), so the peak is
the step's live memory; ``--default-malloc`` measures with glibc's defaults instead.

    .venv/bin/python benchmarks/long_context.py [--seqs 1024,8192,16384,32768,65536] [--cps 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = ["--layers", "1", "--hidden", "64", "--ffn", "128", "--heads", "4", "--groups", "2", "--vocab", "512",
         "--mean-doc", "0", "--steps", "1", "--warmup", "0", "--recompute", "full", "--json"]


def run(seq: int, cp: int, default_malloc: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}",
           str(REPO / "benchmarks" / "train_throughput.py"), "--seq", str(seq), *MODEL,
           "train.loss_chunk_tokens=1024", f"parallel.cp={cp}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"seq {seq} cp {cp} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="1024,8192,16384,32768,65536", help="sequence lengths (the first is the baseline)")
    ap.add_argument("--cps", default="1,2,4", help="context-parallel sizes")
    ap.add_argument("--default-malloc", action="store_true", help="glibc's default (adaptive) mmap threshold")
    a = ap.parse_args()
    seqs, cps = [int(s) for s in a.seqs.split(",")], [int(c) for c in a.cps.split(",")]
    results = {}
    print(f"{'seq':>7} {'CP':>3} {'kernel':<14} {'step s':>8} {'peak RSS/rank GB':>17} {'step memory GB':>15} "
          f"{'x per doubling':>15} {'vs CP=1 mem':>12} {'CPU s':>8} {'vs CP=1 CPU':>12}")
    for seq in seqs:
        for cp in cps:
            r = results[seq, cp] = run(seq, cp, a.default_malloc)
            rss = r["rss_peak_per_rank_gib"] * 2**30 / 1e9
            step_mem = rss - results[seqs[0], cp]["rss_peak_per_rank_gib"] * 2**30 / 1e9
            r["step_mem_gb"] = step_mem
            prev = results.get((seq // 2, cp))
            growth = f"{step_mem / prev['step_mem_gb']:.2f}" if prev and prev.get("step_mem_gb", 0) > 0 else "-"
            base = results.get((seq, 1))
            vs_mem = f"{step_mem / base['step_mem_gb']:.3f}" if base and cp > 1 and base["step_mem_gb"] > 0 else "-"
            vs_cpu = f"{r['cpu_s_all_ranks'] / base['cpu_s_all_ranks']:.3f}" if base and cp > 1 else "-"
            print(f"{seq:>7} {cp:>3} {r['kernel']:<14} {r['step_s']:>8.2f} {rss:>17.2f} {step_mem:>15.2f} "
                  f"{growth:>15} {vs_mem:>12} {r['cpu_s_all_ranks']:>8.1f} {vs_cpu:>12}", flush=True)


if __name__ == "__main__":
    main()
