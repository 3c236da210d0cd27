"""Start-up cost of the data pipeline: packing indexes for millions of documents, and the mix schedule.

    .venv/bin/python benchmarks/index_build.py [--docs 10000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from megaprolong.data.dataset import MixSchedule
from megaprolong.data.packing import PackedIndex, pack_documents


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    short = np.maximum(1, rng.lognormal(6.0, 1.2, size=args.docs)).astype(np.int64)  # web-like, mean ~830
    long = rng.integers(65536, 8 * 65536, size=args.docs // 100)  # >= 64K documents
    rows = []
    order = rng.permutation(len(short))
    idx, t = timed(lambda: pack_documents(short, order, 65536))
    rows.append((f"pack {len(short):,} short docs -> 64K", len(idx), t))
    idx512, t = timed(lambda: pack_documents(short, order, 524288))
    rows.append((f"pack {len(short):,} short docs -> 512K", len(idx512), t))
    ch, t = timed(lambda: pack_documents(long, None, 65536, chunk=65536, rng=np.random.default_rng(1)))
    rows.append((f"chunk {len(long):,} long docs -> 64K", len(ch), t))
    ch8, t = timed(lambda: pack_documents(long, None, 524288, chunk=65536, rng=np.random.default_rng(1)))
    rows.append((f"chunk {len(long):,} long docs, 64K units -> 512K", len(ch8), t))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "index.npz"
        _, t = timed(lambda: np.savez(path, **idx.arrays()))
        rows.append(("save the 64K short index (npz)", len(idx), t))

        def load():
            with np.load(path) as z:
                return PackedIndex(**{k: z[k] for k in ("offsets", "doc", "start", "length")})
        _, t = timed(load)
        rows.append(("load it from the cache", len(idx), t))
    _, t = timed(lambda: MixSchedule([0.3, 0.3, 0.1, 0.1, 0.04, 0.04, 0.03, 0.03, 0.03, 0.03], 5000 * 64))
    rows.append(("mix schedule, stage 1 (5000 steps x 64)", 5000 * 64, t))
    print(f"\n{'operation':<48} {'sequences':>12} {'seconds':>9}")
    for name, n, t in rows:
        print(f"{name:<48} {n:>12,} {t:>9.2f}")


if __name__ == "__main__":
    main()
