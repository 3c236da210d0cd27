"""``--group-by`` in bounded memory: documents with the same key joined into one, groups in the order
of their key's first appearance, each group's texts in input order (what an in-memory dict of lists gives).

1. Spill: every record goes to one of ``B`` bucket files by a hash of its key, with its input position.
2. Group, one bucket at a time (a bucket holds ~1/B of the input): join each key's texts in input order,
   write the group to the bucket's grouped file and remember (first position, bucket, offset, size).
3. Emit the groups in order of first position, reading each from its grouped file.

Memory: one bucket, the largest group, and 32 bytes per group for the order; never the whole input.
Spill files live next to the output, under a temporary folder removed at the end (also on errors).
"""

from __future__ import annotations

import array
import hashlib
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

BUCKET_TARGET_BYTES = 64 << 20  # text per bucket aimed at (input bytes x EXPANSION / buckets)
EXPANSION = 8  # compressed inputs (.zst, .gz, parquet) hold up to ~8x their size in text
MAX_BUCKETS = 512  # open files during the spill
_HEAD = struct.Struct("<QII")  # input position, key bytes, text bytes


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", errors="surrogatepass")  # a lone surrogate is reported later by the tokenizer


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="surrogatepass")


def bucket_count(input_bytes: int) -> int:
    return int(np.clip(-(-input_bytes * EXPANSION // BUCKET_TARGET_BYTES), 1, MAX_BUCKETS))


def _records(path: Path) -> Iterator[tuple[int, bytes, bytes]]:
    with open(path, "rb") as f:
        while head := f.read(_HEAD.size):
            position, nk, nt = _HEAD.unpack(head)
            yield position, f.read(nk), f.read(nt)


def grouped(records: Iterable[tuple[str, str]], separator: str, spill_dir: Path, buckets: int
            ) -> Iterator[tuple[str, str]]:
    """(key, joined text) per group, from (key, text) records in input order."""
    spill_dir.mkdir(parents=True, exist_ok=False)
    try:
        files = [open(spill_dir / f"b{i:04d}", "wb") for i in range(buckets)]
        try:
            for position, (key, text) in enumerate(records):
                k, t = _bytes(key), _bytes(text)
                bucket = int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") % buckets
                files[bucket].write(_HEAD.pack(position, len(k), len(t)) + k + t)
        finally:
            for f in files:
                f.close()
        first_pos, bucket_of, offsets, sizes = (array.array("q") for _ in range(4))  # per group: 32 bytes
        sep = _bytes(separator)
        for b in range(buckets):
            groups: dict[bytes, tuple[int, list[bytes]]] = {}
            for position, k, t in _records(spill_dir / f"b{b:04d}"):
                groups.setdefault(k, (position, []))[1].append(t)
            (spill_dir / f"b{b:04d}").unlink()
            with open(spill_dir / f"g{b:04d}", "wb") as out:
                for k, (first, texts) in groups.items():
                    body = struct.pack("<I", len(k)) + k + sep.join(texts)
                    first_pos.append(first), bucket_of.append(b), offsets.append(out.tell()), sizes.append(len(body))
                    out.write(body)
            del groups
        readers = {}
        for g in np.argsort(np.frombuffer(first_pos, dtype=np.int64), kind="stable"):
            b, offset, size = bucket_of[g], offsets[g], sizes[g]
            f = readers.get(b) or readers.setdefault(b, open(spill_dir / f"g{b:04d}", "rb"))
            f.seek(offset)
            body = f.read(size)
            nk = struct.unpack("<I", body[:4])[0]
            yield _text(body[4:4 + nk]), _text(body[4 + nk:])
        for f in readers.values():
            f.close()
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
