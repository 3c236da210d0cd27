"""``python -m megaprolong.data.write_index LENGTHS.npy DTYPE OUT.idx``: write a Megatron .idx.

megatron-core's IndexedDatasetBuilder writes the index for a .bin of one sequence per document whose
lengths are in LENGTHS.npy. The preprocessor runs it as a child process, so that its large imports
(torch, megatron-core) live only for this step, unless megatron-core is already imported.
"""

import os
import sys

import numpy as np


def write_index(lengths: np.ndarray, dtype_name: str, idx_path: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.dtype(dtype_name).type
    builder = IndexedDatasetBuilder(os.devnull, dtype=dtype)  # the .bin is already written
    builder.sequence_lengths = lengths.astype(np.int32)
    builder.document_indices = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
    builder.finalize(idx_path)


if __name__ == "__main__":
    write_index(np.load(sys.argv[1]), sys.argv[2], sys.argv[3])
