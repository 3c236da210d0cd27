"""Packing documents into fixed-length training sequences that keep their boundaries.

A packed sample of ``S`` tokens carries:

- ``tokens``      int64 [S]   the input ids;
- ``labels``      int64 [S]   ``tokens[i + 1]`` (the next token in the sequence, 0 where there is none);
- ``loss_mask``   float [S]   1 where ``labels[i]`` is a target: the next token exists and belongs to the
  same document, so the first token of every document is never a target (ProLong; REFERENCE.md s.3);
- ``cu_seqlens``  int32 [n+1] document boundaries inside the sample (cumulative lengths).

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


def pack_documents(doc_lengths: np.ndarray, order: np.ndarray, seq_length: int) -> list[list[Segment]]:
    """Concatenate documents (in ``order``) into sequences of exactly ``seq_length`` tokens.

    The document that does not fit is cut; its remainder starts the next sequence (ProLong's short-data
    packing). A final sequence that cannot be filled is dropped. Every token of every document in
    ``order`` appears at most once, in order.
    """
    sequences: list[list[Segment]] = []
    current: list[Segment] = []
    room = seq_length
    for doc in order:
        start, length = 0, int(doc_lengths[doc])
        while start < length:
            take = min(room, length - start)
            current.append((int(doc), start, start + take))
            start += take
            room -= take
            if room == 0:
                sequences.append(current)
                current, room = [], seq_length
    return sequences


def make_sample(segments: list[Segment], read_tokens) -> Sample:
    """Build a :class:`Sample` from segments; ``read_tokens(doc, start, end)`` returns token ids."""
    pieces = [np.asarray(read_tokens(doc, start, end), dtype=np.int64) for doc, start, end in segments]
    tokens = np.concatenate(pieces)
    lengths = np.array([len(p) for p in pieces])
    cu_seqlens = np.zeros(len(pieces) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seqlens[1:])
    labels = np.zeros_like(tokens)
    labels[:-1] = tokens[1:]
    loss_mask = np.ones(len(tokens), dtype=np.float32)
    loss_mask[cu_seqlens[1:] - 1] = 0.0  # the last token of each piece has no next token in its document
    return Sample(tokens=tokens, labels=labels, loss_mask=loss_mask, cu_seqlens=cu_seqlens)
