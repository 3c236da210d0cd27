"""Streaming readers of raw corpora: jsonl (plain, .gz, .zst) and parquet.

Each yields ``(where, record)`` with ``where`` a human location ("file:line" or "file:row") so that bad
input is reported precisely. A bad record raises :class:`DataError`, or, with ``skip_bad``, is yielded as
``(where, DataError)`` for the caller to count.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path


class DataError(ValueError):
    """Bad input data, with the file and record it was found at."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")
        self.where, self.what = where, what


def _zstd_chunks(path: Path, size: int = 1 << 20):
    """Decompressed bytes of a .zst file (one or more frames); a truncated last frame raises EOFError
    (zstandard's stream reader would silently stop short)."""
    import zstandard

    with open(path, "rb") as f:
        dobj, pending = zstandard.ZstdDecompressor().decompressobj(), b""
        while True:
            raw = pending or f.read(size)
            pending = b""
            if not raw:
                break
            yield dobj.decompress(raw)
            if dobj.eof:  # frame complete: a following frame starts in unused_data
                pending, dobj = dobj.unused_data, zstandard.ZstdDecompressor().decompressobj()
                if not pending:
                    pending = f.read(size)
                    if not pending:
                        return
        if not dobj.eof:
            raise EOFError("compressed stream ends before the end of its last frame")


class _ChunkStream(io.RawIOBase):
    def __init__(self, chunks):
        self.chunks, self.buffer = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buffer:
            try:
                self.buffer = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self.buffer))
        b[:n], self.buffer = self.buffer[:n], self.buffer[n:]
        return n


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        return io.BufferedReader(_ChunkStream(_zstd_chunks(path)))
    return open(path, "rb")


def _jsonl(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    line_no = 0
    try:
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                where = f"{path}:{line_no}"
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, DataError(where, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})")
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    yield where, DataError(where, f"malformed JSON: {e.msg} at column {e.colno}")
                    continue
                if not isinstance(obj, dict):
                    yield where, DataError(where, f"expected a JSON object, got {type(obj).__name__}")
                    continue
                yield where, obj
    except (EOFError, OSError) as e:  # truncated .gz raises EOFError, a corrupt .zst a ZstdError (an OSError)
        raise DataError(f"{path}:{line_no + 1}", f"truncated or corrupt file ({e})") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{path}:{line_no + 1}", f"truncated or corrupt file ({e})") from None
        raise


def _parquet(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(str(path), f"not a readable parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", obj


def read_records(path: str | Path) -> Iterator[tuple[str, dict | DataError]]:
    """Records of one input file, in file order."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "input file does not exist")
    name = path.name
    if name.endswith(".parquet"):
        return _parquet(path)
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")):
        return _jsonl(path)
    raise DataError(str(path), "unknown input format (expected .jsonl[.gz|.zst], .parquet or an MDS directory)")
