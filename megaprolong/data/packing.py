"""Packing documents into fixed-length training sequences that keep their boundaries.

Long domains first cut every document into chunks of ``chunk`` tokens (single-document units; a tail
shorter than ``min_chunk`` is dropped). Then units (chunks, or whole short documents) are concatenated in
a shuffled order into sequences of exactly ``seq_length`` tokens; a unit that does not fit is cut and its
remainder starts the next sequence (ProLong's short-data packing). When ``chunk == seq_length`` every
sequence is one chunk; at 512K with 64K chunks, eight chunks share a sequence, each its own document.
Everything is vectorized numpy: 10 million documents pack in seconds.

A packed sample of ``S`` tokens carries:

- ``tokens``      int64 [S]   the input ids;
- ``labels``      int64 [S]   ``tokens[i + 1]`` (0 where there is none);
- ``loss_mask``   float [S]   1 where ``labels[i]`` is a target: the next token exists and belongs to the
  same document, so the first token of every document is never a target (no document is predicted from another);
- ``cu_seqlens``  int32 [n+1] document boundaries inside the sample (cumulative lengths);
- ``domains``     int32 [n]   the domain of each document.

No dense ``S x S`` mask is ever built: attention gets the boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A segment: (document index, first token, one past the last token) inside that document.
Segment = tuple[int, int, int]


@dataclass
class Sample:
    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    cu_seqlens: np.ndarray
    domains: np.ndarray

    @property
    def attention_cost(self) -> int:
        """sum of document_length^2: what document-masked attention costs for this sample."""
        lengths = np.diff(self.cu_seqlens).astype(np.int64)
        return int(np.sum(lengths * lengths))


@dataclass
class PackedIndex:
    """Sequences as runs of segments (CSR): sequence ``i`` is segments ``offsets[i]:offsets[i+1]``."""

    offsets: np.ndarray  # int64 [n_sequences + 1]
    doc: np.ndarray  # int64 [n_segments]
    start: np.ndarray  # int64 [n_segments], first token inside the document
    length: np.ndarray  # int64 [n_segments]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def segments(self, i: int) -> list[Segment]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return [(int(d), int(s), int(s + n)) for d, s, n in zip(self.doc[a:b], self.start[a:b], self.length[a:b])]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"offsets": self.offsets, "doc": self.doc, "start": self.start, "length": self.length}


def chunk_documents(doc_lengths: np.ndarray, chunk: int, min_chunk: int | None = None):
    """Cut documents into units of ``chunk`` tokens; keep a shorter tail only if >= ``min_chunk``.

    Returns (unit_doc, unit_start, unit_length), units of a document consecutive.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    full = lengths // chunk
    tail = lengths - full * chunk
    keep_tail = (tail >= min_chunk) & (tail > 0) if min_chunk is not None else np.zeros(len(lengths), bool)
    per_doc = full + keep_tail
    unit_doc = np.repeat(np.arange(len(lengths), dtype=np.int64), per_doc)
    first_unit = np.cumsum(per_doc) - per_doc
    k = np.arange(len(unit_doc), dtype=np.int64) - np.repeat(first_unit, per_doc)  # chunk number in its doc
    unit_start = k * chunk
    unit_length = np.minimum(chunk, lengths[unit_doc] - unit_start)
    return unit_doc, unit_start, unit_length


def pack_documents(doc_lengths: np.ndarray, order: np.ndarray | None, seq_length: int,
                   chunk: int | None = None, min_chunk: int | None = None,
                   rng: np.random.Generator | None = None) -> PackedIndex:
    """Pack documents into sequences of exactly ``seq_length`` tokens (see the module docstring).

    Short data (``chunk=None``): documents in ``order``. Long data: documents cut into chunks, the chunks
    shuffled by ``rng`` (``order`` unused). A last sequence that cannot be filled is dropped.
    """
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if chunk is None:
        unit_doc = np.asarray(order, dtype=np.int64)
        unit_start = np.zeros(len(unit_doc), dtype=np.int64)
        unit_len = lengths[unit_doc]
    else:
        unit_doc, unit_start, unit_len = chunk_documents(lengths, chunk, min_chunk)
        if rng is not None:
            perm = rng.permutation(len(unit_doc))
            unit_doc, unit_start, unit_len = unit_doc[perm], unit_start[perm], unit_len[perm]
    nonempty = unit_len > 0
    unit_doc, unit_start, unit_len = unit_doc[nonempty], unit_start[nonempty], unit_len[nonempty]
    ends = np.cumsum(unit_len)
    begins = ends - unit_len  # where each unit starts in the concatenation, strictly increasing
    n_seq = int(ends[-1]) // seq_length if len(ends) else 0
    limit = n_seq * seq_length
    seq_begins = np.arange(n_seq, dtype=np.int64) * seq_length
    # Segments start at every unit start below the limit, plus every sequence start that falls inside a
    # unit. Both lists are sorted: merge them in O(n) (np.insert) rather than sorting 10M positions.
    n_units = int(np.searchsorted(begins, limit, side="left"))
    covering = np.searchsorted(ends, seq_begins, side="right")  # the unit each sequence starts in
    inside = begins[covering] != seq_begins
    where = np.searchsorted(begins[:n_units], seq_begins[inside], side="right")
    starts = np.insert(begins[:n_units], where, seq_begins[inside])
    unit = np.insert(np.arange(n_units, dtype=np.int64), where, covering[inside])
    seg_end = np.append(starts[1:], limit)
    offsets = np.searchsorted(starts, np.append(seq_begins, limit))
    return PackedIndex(offsets=offsets.astype(np.int64), doc=unit_doc[unit],
                       start=unit_start[unit] + (starts - begins[unit]), length=seg_end - starts)


def make_sample(segments: list[Segment], read_tokens, domain: int = 0) -> Sample:
    """Build a :class:`Sample` from segments; ``read_tokens(doc, start, end)`` returns token ids."""
    pieces = [np.asarray(read_tokens(doc, start, end), dtype=np.int64) for doc, start, end in segments]
    tokens = np.concatenate(pieces)
    cu_seqlens = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum([len(p) for p in pieces], out=cu_seqlens[1:])
    labels = np.zeros_like(tokens)
    labels[:-1] = tokens[1:]
    loss_mask = np.ones(len(tokens), dtype=np.float32)
    loss_mask[cu_seqlens[1:] - 1] = 0.0  # the last token of each piece has no next token in its document
    return Sample(tokens=tokens, labels=labels, loss_mask=loss_mask, cu_seqlens=cu_seqlens,
                  domains=np.full(len(pieces), domain, dtype=np.int32))


def balance_micro_batches(samples: list[Sample], dp_size: int, micro_batch_size: int) -> list[Sample]:
    """Order a global batch so micro-batch ``m`` of every data-parallel rank has a similar attention cost.

    Samples sorted by cost are dealt out so that the ``m``-th micro-batches of all ranks take consecutive
    ranks of the sorted list (ProLong reports +11.7% throughput from sorting by attention cost). Rank ``r`` then takes the
    contiguous slice ``r`` of the result.
    """
    by_cost = sorted(samples, key=lambda s: s.attention_cost, reverse=True)
    per_rank = len(samples) // dp_size
    out: list[Sample] = [None] * len(samples)  # type: ignore[list-item]
    for pos, sample in enumerate(by_cost):
        group, j = divmod(pos, micro_batch_size)  # group = micro-batch index * dp_size + rank
        m, r = divmod(group, dp_size)
        out[r * per_rank + m * micro_batch_size + j] = sample
    return out
