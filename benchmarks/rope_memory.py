"""RoPE's memory over many packed micro-batches: peak RSS of 40 forwards whose longest documents all differ in
length, against the same run on documents of one length, with the model's one RoPE table (ours) and with
megatron-core's per-length cache (``--megatron-cache``: up to 32 tables, one per length asked for).

A wide head (1 x 512) and a small vocabulary (256), so that a RoPE table (length x 512 x 4 bytes) is visible
next to the weights and activations. Each case runs in its own process (torchrun, 1 CPU rank); forward only.

    .venv/bin/python benchmarks/rope_memory.py [--seq 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(seq: int, varied: bool, megatron_cache: bool) -> None:
    import numpy as np
    import torch

    if megatron_cache:  # what megatron-core does by itself: a table per length asked for, 32 kept
        from megaprolong.runtime import mcore_fixes

        mcore_fixes.rotary_with_one_table = lambda rotary, max_len: None
        from megaprolong.training import trainer as trainer_module

        trainer_module.rotary_with_one_table = mcore_fixes.rotary_with_one_table
    from megaprolong.config import load_config
    from megaprolong.data.packing import make_sample
    from megaprolong.training.config import Config
    from megaprolong.training.trainer import Trainer

    cfg = load_config(Config, None, [
        "model.num_layers=1", "model.hidden_size=512", "model.ffn_hidden_size=512", "model.num_attention_heads=1",
        "model.num_query_groups=1", "model.vocab_size=256", f"model.max_position_embeddings={seq}",
        f"train.seq_length={seq}", "train.global_batch_size=1", "train.precision=fp32", "train.recompute=none"])
    trainer = Trainer(cfg)
    rng = np.random.default_rng(0)
    long = int(seq * 0.75)
    samples = []
    for i in range(40):
        lengths = [long + (17 * i if varied else 0)] + [int(n) for n in rng.integers(20, 200, size=16)]
        lengths.append(seq - sum(lengths))
        docs = [rng.integers(0, 256, size=n) for n in lengths]
        samples.append(make_sample([(d, 0, n) for d, n in enumerate(lengths)], lambda d, a, b: docs[d][a:b]))
    trainer.num_domains = 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for s in samples:
        with torch.no_grad():
            trainer.evaluate([s], num_domains=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_bytes": peak * 1024, "before_bytes": before * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--worker", nargs=2, metavar=("VARIED", "MEGATRON_CACHE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.seq, a.worker[0] == "1", a.worker[1] == "1")
        return
    rows = {}
    for cache in (False, True):
        for varied in (False, True):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", __file__,
                   "--seq", str(a.seq), "--worker", str(int(varied)), str(int(cache))]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            rows[cache, varied] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    print(f"40 packed forwards of {a.seq:,} tokens, head 1 x 512, vocabulary 256, 1 CPU rank: peak RSS")
    print(f"{'RoPE':<26} {'one length GiB':>15} {'varied lengths GiB':>19} {'varied / one':>13}")
    for cache, name in ((False, "one table (megaprolong)"), (True, "megatron's per-length cache")):
        one, varied = rows[cache, False], rows[cache, True]
        print(f"{name:<26} {one / 2**30:>15.2f} {varied / 2**30:>19.2f} {varied / one:>13.3f}")


if __name__ == "__main__":
    main()
