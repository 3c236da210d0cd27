"""A minimal MDS writer for tests (one uncompressed shard), so a test can build ProLong-layout shards from
data it controls. Checked byte for byte against a shard written by mosaicml-streaming's MDSWriter
(tests/fixtures/mds/sft_raw) in test_sft.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_SHAPE_CODES = [(np.uint8, 0), (np.uint16, 1), (np.uint32, 2), (np.uint64, 3)]


def _encode(encoding: str, value) -> bytes:
    if encoding == "str":
        return value.encode("utf-8")
    if encoding == "int":
        return np.int64(value).tobytes()
    if encoding.startswith("ndarray:"):
        arr = np.ascontiguousarray(value, dtype=encoding.split(":")[1])
        shape_dtype, code = next((t, c) for t, c in _SHAPE_CODES if max(arr.shape, default=0) <= np.iinfo(t).max)
        return bytes([(arr.ndim << 2) | code]) + np.asarray(arr.shape, shape_dtype).tobytes() + arr.tobytes()
    raise ValueError(encoding)


def write_mds(out: Path, columns: dict[str, str], samples: list[dict], size_limit: int = 1 << 20) -> None:
    names = sorted(columns)
    encodings = [columns[n] for n in names]
    sizes = [8 if e == "int" else None for e in encodings]
    blobs = []
    for s in samples:
        parts = [_encode(e, s[n]) for n, e in zip(names, encodings)]
        head = b"".join(np.uint32(len(p)).tobytes() for p, size in zip(parts, sizes) if size is None)
        blobs.append(head + b"".join(parts))
    config = {"column_encodings": encodings, "column_names": names, "column_sizes": sizes, "compression": None,
              "format": "mds", "hashes": [], "size_limit": size_limit, "version": 2}
    header = json.dumps(config, sort_keys=True).encode()  # MDSWriter puts its config after the offsets
    n = len(blobs)
    offsets = np.cumsum([4 + 4 * (n + 1) + len(header)] + [len(b) for b in blobs]).astype(np.uint32)
    data = np.uint32(n).tobytes() + offsets.tobytes() + header + b"".join(blobs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard.00000.mds").write_bytes(data)
    shard = dict(config, raw_data={"basename": "shard.00000.mds", "bytes": len(data), "hashes": {}}, samples=n,
                 zip_data=None)
    (out / "index.json").write_text(json.dumps({"shards": [shard], "version": 2}, sort_keys=True))
