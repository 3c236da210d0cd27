"""Packed training sequences read from a Megatron indexed dataset."""

from __future__ import annotations

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaprolong.data.packing import Sample, make_sample, pack_documents


class PackedDataset:
    """Documents of one indexed dataset, shuffled with ``seed`` and packed into ``seq_length`` sequences."""

    def __init__(self, prefix: str, seq_length: int, seed: int):
        self.indexed = IndexedDataset(prefix)
        lengths = self.indexed.sequence_lengths
        order = np.random.default_rng(seed).permutation(len(lengths))
        self.sequences = pack_documents(lengths, order, seq_length)
        if not self.sequences:
            raise ValueError(f"{prefix}: {int(lengths.sum())} tokens are fewer than one sequence of {seq_length}")

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> Sample:
        return make_sample(self.sequences[i % len(self.sequences)], self._read)

    def _read(self, doc: int, start: int, end: int) -> np.ndarray:
        return self.indexed.get(doc, offset=start, length=end - start)

    def global_batch(self, step: int, size: int) -> list[Sample]:
        """The ``size`` samples of optimizer step ``step`` (wrapping around at the end of the data)."""
        return [self[step * size + j] for j in range(size)]
