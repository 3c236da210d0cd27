"""Read mosaicml-streaming MDS datasets (ProLong's released data) without mosaicml-streaming.

mosaicml-streaming pins old transformers and numpy (its releases require older transformers and numpy than ours), so it is not a dependency;
the format is small and documented: ``index.json`` lists shards, each shard is
``[n: uint32][offsets: (n + 1) x uint32][samples]`` (optionally zstd-compressed as a whole), and each
sample is ``[uint32 size of every variable-size column][column bytes ...]``. The tests read shards
written by mosaicml-streaming's own MDSWriter (tests/fixtures/mds).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megaprolong.data.readers import DataError

_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}
_SCALARS = {"int": np.int64, **{name: getattr(np, name) for name in set(_VALUE_DTYPES.values())}}


def is_mds(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "index.json").exists() or p.is_dir() and any(p.rglob("index.json"))


def _decode(encoding: str, data: bytes):
    if encoding == "str":
        return data.decode("utf-8")
    if encoding in _SCALARS:
        return _SCALARS[encoding](np.frombuffer(data, _SCALARS[encoding])[0]).item()
    if encoding.startswith("ndarray"):
        args = encoding.split(":")[1:]
        pos = 0
        if args:
            dtype = args[0]
        else:
            dtype, pos = _VALUE_DTYPES[data[0]], 1
        if len(args) > 1:
            shape = tuple(int(x) for x in args[1].split(","))
        else:
            ndim, shape_dtype = data[pos] >> 2, _SHAPE_DTYPES[data[pos] % 4]
            nbytes = ndim * np.dtype(shape_dtype).itemsize
            shape = tuple(int(x) for x in np.frombuffer(data[pos + 1:pos + 1 + nbytes], shape_dtype))
            pos += 1 + nbytes
        return np.frombuffer(data[pos:], dtype).reshape(shape)
    if encoding == "json":
        return json.loads(data)
    raise ValueError(f"unsupported MDS column encoding {encoding!r}")


def _shard_bytes(root: Path, shard: dict) -> bytes:
    compression = shard.get("compression")
    if not compression:
        return (root / shard["raw_data"]["basename"]).read_bytes()
    if compression.split(":")[0] != "zstd":
        raise DataError(str(root), f"MDS compression {compression!r} is not supported (only zstd or none)")
    import zstandard

    raw_size = shard["raw_data"]["bytes"]
    return zstandard.ZstdDecompressor().decompress((root / shard["zip_data"]["basename"]).read_bytes(),
                                                   max_output_size=raw_size)


def _index_files(path: Path) -> list[Path]:
    if (path / "index.json").exists():
        return [path / "index.json"]
    return sorted(path.rglob("index.json"))  # a root holding one MDS directory per domain


def read_mds(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, sample dict) of every sample, shards in index order; a corrupt shard raises DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "input does not exist")
    for index_file in _index_files(path):
        root = index_file.parent
        try:
            shards = json.loads(index_file.read_text())["shards"]
        except (json.JSONDecodeError, KeyError) as e:
            raise DataError(str(index_file), f"not an MDS index ({e})") from None
        for shard in shards:
            name = shard.get("raw_data", {}).get("basename", "?")
            if shard.get("format") != "mds":
                raise DataError(f"{root / name}", f"shard format {shard.get('format')!r} is not mds")
            try:
                data = _shard_bytes(root, shard)
                n = int(np.frombuffer(data[:4], np.uint32)[0])
                if n != shard["samples"]:
                    raise ValueError(f"header says {n} samples, index.json {shard['samples']}")
                offsets = np.frombuffer(data[4:4 + 4 * (n + 1)], np.uint32)
                if len(offsets) != n + 1 or offsets[-1] != len(data):
                    raise ValueError(f"sample offsets do not match the shard's {len(data)} bytes")
            except Exception as e:
                raise DataError(str(root / name), f"corrupt MDS shard ({e})") from None
            names, encodings, sizes = shard["column_names"], shard["column_encodings"], shard["column_sizes"]
            for i in range(n):
                where = f"{root / name}:sample {i}"
                sample = data[offsets[i]:offsets[i + 1]]
                try:
                    pos, lengths = 0, []
                    for size in sizes:
                        if size:
                            lengths.append(size)
                        else:
                            lengths.append(int(np.frombuffer(sample[pos:pos + 4], np.uint32)[0]))
                            pos += 4
                    record = {}
                    for key, enc, size in zip(names, encodings, lengths):
                        record[key] = _decode(enc, sample[pos:pos + size])
                        pos += size
                except Exception as e:
                    raise DataError(where, f"corrupt MDS sample ({e})") from None
                yield where, record


def split_documents(where: str, sample: dict) -> Iterator[np.ndarray]:
    """The original documents inside a ProLong packed sample, from its ``indices`` (start, end) pairs."""
    ids = sample.get("input_ids")
    if ids is None:
        raise DataError(where, "MDS sample has no input_ids column")
    indices = sample.get("indices")
    if indices is None:
        yield ids
        return
    indices = np.asarray(indices).reshape(-1, 2)
    for start, end in indices:
        if not 0 <= start <= end <= len(ids):
            raise DataError(where, f"document bounds ({start}, {end}) outside the sample's {len(ids)} tokens")
        yield ids[start:end]
