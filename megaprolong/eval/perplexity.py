"""Long-document perplexity by token position, from held-out documents of an indexed dataset."""

from __future__ import annotations

from typing import Any

import numpy as np


def position_buckets(length: int, first: int = 128) -> list[tuple[int, int]]:
    """[start, end) position ranges doubling in size: [1, 128), [128, 256), ... up to ``length``."""
    edges = [1]
    edge = first
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


def bucket_losses(nll: np.ndarray, length: int) -> list[dict]:
    """Mean loss per position bucket; ``nll[i]`` is the loss of the token at position i + 1."""
    return [{"start": a, "end": b, "loss": float(nll[a - 1:b - 1].mean())} for a, b in position_buckets(length)]


def perplexity_by_position(backend: Any, prefix: str, length: int, documents: int = 8, chunk: int = 4096,
                           seed: int = 42) -> dict:
    """Loss by position over the first ``length`` tokens of up to ``documents`` documents of at least that
    many tokens, drawn with ``seed`` from the indexed dataset ``prefix`` (PREFIX.bin / PREFIX.idx)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    eligible = np.flatnonzero(lengths >= length)
    if len(eligible) == 0:
        raise ValueError(f"{prefix}: no document has {length} tokens (longest: {int(lengths.max())}); "
                         f"use longer held-out documents or smaller --lengths")
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, min(documents, len(eligible)), replace=False))
    nll = np.stack([backend.token_nll(ds.get(int(i), 0, length).astype(np.int64).tolist(), chunk) for i in chosen])
    mean = nll.mean(axis=0)
    return {"documents": [int(i) for i in chosen], "loss": float(mean.mean()), "ppl": float(np.exp(mean.mean())),
            "buckets": bucket_losses(mean, length)}
