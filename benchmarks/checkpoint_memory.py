"""Per-rank peak host memory and time of a checkpoint save and load, per optimizer format, on CPU ranks.

A model large enough that its state dominates (~80M parameters, fp32) trains one step under
``--nproc`` ranks (DP, or DP x TP with ``parallel.tp=2``) with the distributed optimizer; then every format
saves and loads the same state. "peak above" is each rank's peak RSS during the call minus its RSS before
(the kernel's high-water mark is reset first through /proc/self/clear_refs), the largest over ranks;
"shard" is what the rank holds of model + grads + optimizer state, "written" the checkpoint's bytes per rank.
Then the cost of the full-content digests: the rank-local save timed with them (every byte hashed as it is
written) and without (the same writer on a plain file stream, the record holding sizes only), best of
``--repeats``, and the parallel verification a resume runs (every rank reading and hashing its own files).

    .venv/bin/python benchmarks/checkpoint_memory.py [--nproc 4] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = ["model.num_layers=4", "model.hidden_size=768", "model.ffn_hidden_size=3072", "model.num_attention_heads=8",
         "model.num_query_groups=8", "model.vocab_size=32000", "train.seq_length=256", "train.precision=fp32",
         "train.recompute=none", "train.steps=1", "train.micro_batch_size=1"]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _measured(fn) -> tuple[float, int]:
    """(seconds, peak RSS above the RSS before) of ``fn()``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before, start = _status("VmRSS:"), time.perf_counter()
    fn()
    return time.perf_counter() - start, _status("VmHWM:") - before


def worker(out_dir: str, overrides: list[str], repeats: int) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import synthetic_batch

    from megaprolong.config import load_config
    from megaprolong.training import checkpoint
    from megaprolong.training.config import Config
    from megaprolong.training.trainer import Trainer

    cfg = load_config(Config, None, MODEL + overrides)
    world = int(os.environ["WORLD_SIZE"])
    cfg.train.global_batch_size = cfg.parallel.dp(world)
    trainer = Trainer(cfg)
    trainer.train_step(synthetic_batch(trainer.dp_size, cfg.train.seq_length, cfg.model.vocab_size, 64,
                                       np.random.default_rng(0)))
    model_bytes = sum(p.numel() * p.element_size() * 2 for c in trainer.model for p in c.parameters())  # + grads
    opt_bytes = sum(t.numel() * t.element_size() for opt in getattr(trainer.optimizer, "chained_optimizers",
                                                                      [trainer.optimizer])
                    for state in opt.optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    rows = {}
    for fmt in ("dp_reshardable", "fully_reshardable"):
        cfg.checkpoint.optimizer_format = fmt
        root = Path(out_dir) / fmt
        save_s, save_peak = _measured(lambda: checkpoint.save(trainer, root))
        path = checkpoint.complete_checkpoints(root)[-1]
        load_s, load_peak = _measured(lambda: checkpoint.load(trainer, path, resume=True))
        written = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / world  # per rank, on average
        stats = torch.tensor([save_s, save_peak, load_s, load_peak, written], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        rows[fmt] = stats.tolist()
    shard = torch.tensor([model_bytes + opt_bytes], dtype=torch.float64)
    dist.all_reduce(shard, op=dist.ReduceOp.MAX)
    digests = _digest_cost(trainer, Path(out_dir) / "digests", repeats)
    if dist.get_rank() == 0:
        print(json.dumps({"rows": rows, "shard_bytes": shard.item(), "world": world, "digests": digests,
                          "layout": f"tp{cfg.parallel.tp} dp{trainer.dp_size}"}))
    dist.destroy_process_group()


class _PlainStream:
    """A file stream without digests: what the save costs without them."""

    def __init__(self, path, rank):
        self._file = open(path, "wb")  # noqa: SIM115

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _digest_cost(trainer, root: Path, repeats: int) -> dict:
    """Rank-local save time with and without digests (best of ``repeats``, slowest rank) and the parallel
    verification time of the saved checkpoint."""
    import torch
    import torch.distributed as dist

    from megaprolong.training import checkpoint, manifest, sync_save

    trainer.cfg.checkpoint.optimizer_format = "dp_reshardable"

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def save(i):
        return lambda: checkpoint.save(trainer, root / str(i))

    with_digests, without = [], []
    for i in range(repeats):
        with_digests.append(timed(save(2 * i)))
        stream, collect = sync_save.HashingStream, manifest.collect
        sync_save.HashingStream = _PlainStream
        manifest.collect = lambda folder, exclude=(): {str(p.relative_to(folder)): {"bytes": p.stat().st_size}
                                                       for p in folder.rglob("*") if p.is_file() and p.name not in exclude}
        try:
            without.append(timed(save(2 * i + 1)))
        finally:
            sync_save.HashingStream, manifest.collect = stream, collect
    path = checkpoint.complete_checkpoints(root / "0")[-1]
    verify_s = timed(lambda: checkpoint.verify_on_all_ranks(path))
    nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"with_s": min(with_digests), "without_s": min(without), "verify_s": verify_s, "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="CPU ranks")
    ap.add_argument("--repeats", type=int, default=3, help="saves timed with and without digests (best kept)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.overrides, a.repeats)
        return
    out = tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               __file__, "--worker", out, "--repeats", str(a.repeats), *a.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    gib = 2**30
    print(f"{r['world']} CPU ranks, {r['layout']}; per-rank model + grads + optimizer shard "
          f"{r['shard_bytes'] / gib:.2f} GiB (largest rank)")
    print(f"{'optimizer format':<20} {'written/rank GiB':>16} {'save s':>8} {'save peak above GiB':>20} "
          f"{'x shard':>8} {'x written':>9} {'load s':>8} {'load peak above GiB':>20} {'x shard':>8}")
    for fmt, (save_s, save_peak, load_s, load_peak, written) in r["rows"].items():
        print(f"{fmt:<20} {written / gib:>16.2f} {save_s:>8.2f} {save_peak / gib:>20.2f} "
              f"{save_peak / r['shard_bytes']:>8.2f} {save_peak / written:>9.2f} {load_s:>8.2f} "
              f"{load_peak / gib:>20.2f} {load_peak / r['shard_bytes']:>8.2f}")
    d = r["digests"]
    print(f"full-content digests (dp_reshardable save, {d['bytes'] / gib:.2f} GiB in all, best of {a.repeats}): "
          f"save {d['with_s']:.2f} s with, {d['without_s']:.2f} s without ({d['with_s'] / d['without_s']:.2f}x); "
          f"verification at resume {d['verify_s']:.2f} s ({d['bytes'] / d['verify_s'] / gib:.2f} GiB/s over "
          f"{r['world']} ranks)")


if __name__ == "__main__":
    main()
