"""Summaries of an indexed dataset: documents, tokens, and a length histogram."""

from __future__ import annotations

import numpy as np


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(lower bound, upper bound, documents, tokens) per power-of-two length bucket."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    rows = []
    for b in range(int(buckets.min()), int(buckets.max()) + 1):
        sel = buckets == b
        if sel.any():
            rows.append((1 << b, (1 << (b + 1)) - 1, int(sel.sum()), int(lengths[sel].sum())))
    return rows


def describe(prefix: str) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths.astype(np.int64)
    total = int(lengths.sum())
    lines = [f"{prefix}: {len(lengths):,} documents, {total:,} tokens ({ds.index.dtype.__name__})",
             f"length: min {lengths.min():,}  median {int(np.median(lengths)):,}  mean {lengths.mean():,.1f}  "
             f"max {lengths.max():,}",
             f"{'tokens per document':>24} {'documents':>12} {'tokens':>14} {'% tokens':>9}"]
    for lo, hi, docs, toks in length_histogram(lengths):
        lines.append(f"{f'{lo:,} - {hi:,}':>24} {docs:>12,} {toks:>14,} {100 * toks / max(total, 1):>8.1f}%")
    return "\n".join(lines)
