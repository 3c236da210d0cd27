"""Splitting a packed (THD) sample over context-parallel ranks, and where each local token sits globally.

The layout is TransformerEngine's ``thd_get_partitioned_indices``: every
document is padded to a multiple of ``2 * cp``, cut into ``2 * cp`` chunks of ``c`` tokens, and rank ``r``
keeps chunks ``r`` and ``2 * cp - 1 - r`` of every document, documents in order. This balances causal
attention work across ranks. One implementation serves both attention paths (TE's and ours) and the data.

Labels and the loss mask are built in global pack order *before* the split (never shift local tokens:
they are not contiguous); padding is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaprolong.data.packing import Sample


@dataclass
class LocalPacked:
    """This rank's share of a packed sample plus what attention and RoPE need about the whole sample."""

    tokens: np.ndarray  # int64 [T / cp]
    labels: np.ndarray  # int64 [T / cp]
    loss_mask: np.ndarray  # float32 [T / cp]
    domains: np.ndarray  # int32 [T / cp], -1 on padding
    position_ids: np.ndarray  # int64 [T / cp], restarting at each document
    cu_seqlens: np.ndarray  # int32 [n + 1], real document lengths, global
    cu_seqlens_padded: np.ndarray  # int32 [n + 1], padded lengths, global (T = cu_seqlens_padded[-1])
    max_seqlen: int  # largest padded document


def padded_lengths(lengths: np.ndarray, cp: int, total_multiple: int = 1) -> np.ndarray:
    """Each length rounded up to a multiple of 2*cp (1 without CP); the last one extended further so the
    total is a multiple of ``total_multiple`` (e.g. 2*cp*tp under sequence parallelism)."""
    unit = 2 * cp if cp > 1 else 1
    padded = -(-np.asarray(lengths, dtype=np.int64) // unit) * unit
    need = int(np.lcm(unit, total_multiple))
    padded[-1] += (-int(padded.sum())) % need
    return padded


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths  # where each range begins in the output
    return np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)


def zigzag_chunks(cu_seqlens_padded: np.ndarray, cp: int, rank: int):
    """Global (start, length) of ``rank``'s chunks in local order, and each chunk's document start."""
    doc_start = np.asarray(cu_seqlens_padded[:-1], dtype=np.int64)
    if cp == 1:
        return doc_start, np.diff(np.asarray(cu_seqlens_padded, dtype=np.int64)), doc_start
    c = np.diff(np.asarray(cu_seqlens_padded, dtype=np.int64)) // (2 * cp)
    starts = np.stack([doc_start + rank * c, doc_start + (2 * cp - 1 - rank) * c], axis=1).reshape(-1)
    return starts, np.repeat(c, 2), np.repeat(doc_start, 2)


def gathered_positions(cu_seqlens_padded: np.ndarray, cp: int) -> np.ndarray:
    """The global position of every row of a tensor all-gathered over the CP group (rank-major)."""
    return np.concatenate([partition_index(cu_seqlens_padded, cp, r) for r in range(cp)])


def rank_major_row(cu_seqlens_padded: np.ndarray, cp: int) -> np.ndarray:
    """For every global position, its row in the K/V all-gathered over the CP group (rank-major)."""
    cu = np.asarray(cu_seqlens_padded, dtype=np.int64)
    total = int(cu[-1])
    if cp == 1:
        return np.arange(total, dtype=np.int64)
    lengths = np.diff(cu)
    c = np.repeat(lengths // (2 * cp), lengths)  # chunk size of each position's document
    offset = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)  # position inside its document
    chunk = offset // c
    first_half = chunk < cp
    rank = np.where(first_half, chunk, 2 * cp - 1 - chunk)
    # each rank holds 2c rows per document, documents in order: rows before this document, then the chunk
    rows_before = np.repeat(cu[:-1] // cp, lengths)
    local = rows_before + np.where(first_half, 0, c) + offset % c
    return rank * (total // cp) + local


def partition_index(cu_seqlens_padded: np.ndarray, cp: int, rank: int) -> np.ndarray:
    """Global positions held by ``rank``, in local order (TE's thd_get_partitioned_indices)."""
    starts, lengths, _ = zigzag_chunks(cu_seqlens_padded, cp, rank)
    return concat_ranges(starts, lengths)


def split_for_context_parallel(sample: Sample, cp: int, rank: int, total_multiple: int = 1) -> LocalPacked:
    """Pad every document of ``sample`` and keep ``rank``'s zigzag share (everything per token)."""
    lengths = np.diff(sample.cu_seqlens).astype(np.int64)
    padded = padded_lengths(lengths, cp, total_multiple)
    total = int(padded.sum())
    cu_padded = np.zeros(len(padded) + 1, dtype=np.int32)
    np.cumsum(padded, out=cu_padded[1:])
    # where each real token goes in the padded global layout (padding at the end of each document)
    doc_of_token = np.repeat(np.arange(len(lengths)), lengths)
    offset_in_doc = np.arange(len(doc_of_token)) - np.repeat(sample.cu_seqlens[:-1], lengths)
    dest = cu_padded[:-1][doc_of_token] + offset_in_doc
    tokens = np.zeros(total, dtype=np.int64)
    labels = np.zeros(total, dtype=np.int64)
    loss_mask = np.zeros(total, dtype=np.float32)
    domains = np.full(total, -1, dtype=np.int32)
    tokens[dest], labels[dest], loss_mask[dest] = sample.tokens, sample.labels, sample.loss_mask
    domains[dest] = sample.domains[doc_of_token]
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu_padded[:-1].astype(np.int64), padded)
    index = partition_index(cu_padded, cp, rank)
    return LocalPacked(tokens=tokens[index], labels=labels[index], loss_mask=loss_mask[index],
                       domains=domains[index], position_ids=positions[index],
                       cu_seqlens=sample.cu_seqlens.astype(np.int32), cu_seqlens_padded=cu_padded,
                       max_seqlen=int(padded.max()))


def concat_packed(parts: list[LocalPacked]) -> LocalPacked:
    """Several samples as one THD micro-batch (micro_batch_size > 1): documents of all, in order."""
    if len(parts) == 1:
        return parts[0]

    def cat_cu(cus):
        out, base = [np.zeros(1, dtype=np.int32)], 0
        for cu in cus:
            out.append(cu[1:] + base)
            base += int(cu[-1])
        return np.concatenate(out).astype(np.int32)

    return LocalPacked(
        tokens=np.concatenate([p.tokens for p in parts]), labels=np.concatenate([p.labels for p in parts]),
        loss_mask=np.concatenate([p.loss_mask for p in parts]), domains=np.concatenate([p.domains for p in parts]),
        position_ids=np.concatenate([p.position_ids for p in parts]),
        cu_seqlens=cat_cu([p.cu_seqlens for p in parts]), cu_seqlens_padded=cat_cu([p.cu_seqlens_padded for p in parts]),
        max_seqlen=max(p.max_seqlen for p in parts))
