"""Start-up checks of a recipe's files: every problem named (file and what was expected) before any
process group or model is built, so that a bad path costs a second, not a multi-node allocation.

An indexed dataset is ``PREFIX.idx`` + ``PREFIX.bin`` (megatron-core's format). The ``.idx`` holds a
header (the 9-byte magic ``MMIDIDX\\x00\\x00``, ``<Q`` version 1, ``<B`` dtype code, ``<Q`` sequence count
``S``, ``<Q`` document count ``D``), then ``S`` int32 sequence lengths, ``S`` int64 byte pointers into the
``.bin`` and ``D`` int64 document indices (plus ``S`` int8 modes in multimodal datasets). The ``.bin``
holds the tokens: its size is the last pointer plus the last length times the token size.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
TOKEN_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core's dtype codes -> bytes


def check_indexed(prefix: str | Path) -> list[str]:
    """Problems of the indexed dataset ``prefix`` (empty when it is readable and consistent)."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    missing = [p for p in (idx, bin_) if not p.is_file()]
    if len(missing) == 2:
        return [f"{prefix}: no indexed dataset there ({idx.name} and {bin_.name} not found)"]
    if missing:
        return [f"{missing[0]}: not found (an indexed dataset is PREFIX.idx + PREFIX.bin)"]
    size = idx.stat().st_size
    if size < HEADER_BYTES:
        return [f"{idx}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of a megatron index"]
    with open(idx, "rb") as f:
        magic, (version,), (code,), (seqs,), (docs,) = (f.read(9), struct.unpack("<Q", f.read(8)),
                                                        struct.unpack("<B", f.read(1)), struct.unpack("<Q", f.read(8)),
                                                        struct.unpack("<Q", f.read(8)))
    if magic != MAGIC:
        return [f"{idx}: not a megatron index (magic {magic!r}, expected {MAGIC!r})"]
    if version != 1:
        return [f"{idx}: index version {version}, expected 1"]
    if code not in TOKEN_BYTES:
        return [f"{idx}: dtype code {code}, expected one of {sorted(TOKEN_BYTES)}"]
    expected = HEADER_BYTES + 12 * seqs + 8 * docs
    if size not in (expected, expected + seqs):
        return [f"{idx}: {size:,} bytes, expected {expected:,} for its {seqs:,} sequences and {docs:,} document "
                f"indices (truncated or not an index?)"]
    if seqs == 0:
        return []
    table = np.memmap(idx, mode="r", dtype=np.uint8)
    last_length = int(table[HEADER_BYTES + 4 * (seqs - 1):HEADER_BYTES + 4 * seqs].view(np.int32)[0])
    last_pointer = int(table[HEADER_BYTES + 4 * seqs + 8 * (seqs - 1):HEADER_BYTES + 12 * seqs].view(np.int64)[0])
    want = last_pointer + last_length * TOKEN_BYTES[code]
    have = bin_.stat().st_size
    if have != want:
        return [f"{bin_}: {have:,} bytes, expected {want:,} as its index {idx.name} describes "
                f"({'truncated' if have < want else 'longer than indexed'})"]
    return []


def check_checkpoint_path(key: str, path: str) -> list[str]:
    """``checkpoint.load`` / ``checkpoint.resume``: a step_N checkpoint, or a run's folder holding some."""
    p = Path(path)
    if not p.exists():
        return [f"{key}={path}: not found"]
    if (p / "megaprolong.json").is_file() or any(p.glob("step_*/megaprolong.json")):
        return []
    return [f"{key}={path}: neither a checkpoint (no megaprolong.json) nor a folder of step_N checkpoints"]


def check_writable_dir(key: str, path: str) -> list[str]:
    """A folder that will be created if needed: its nearest existing ancestor must be a writable folder."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return [f"{key}={path}: {p} is not a folder"]
    if not os.access(p, os.W_OK):
        return [f"{key}={path}: {p} is not writable"]
    return []
