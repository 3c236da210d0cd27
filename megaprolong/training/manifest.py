"""What a complete checkpoint contains, recorded when it is published, and checked before it is loaded.

The record holds every file's size and the xxh3-64 digest of its whole content, so a truncation, a bit flip
or a zeroed stretch anywhere in a 1 GiB shard is caught, not only damage at its ends.

- Tensor shards are hashed while they are written, by the rank that writes them: the writer's stream is a
  :class:`HashingStream`, which digests every buffer it hands to the OS (no second read) and, when the file
  is closed, leaves the digest beside it in ``NAME.xxh3.json``. When the checkpoint is published, rank 0
  folds these sidecars into the record (:func:`collect`); the few small files other code writes
  (megatron's metadata, RNG states) are read and hashed there.
- Verification is parallel: each entry names the rank that wrote it, and at resume every rank checks the
  files of its own index (modulo the new world size), then the ranks share their findings.

What is not covered: a file changed identically in content and size (impossible by accident), damage in
memory before the bytes reached the writer (a bad GPU or host RAM writes a valid-looking shard), and a
checkpoint that megatron-core itself wrote wrongly.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import xxhash

SIDECAR = ".xxh3.json"  # NAME.xxh3.json: NAME's digest, written by the rank that wrote NAME
_READ_BYTES = 8 << 20
_LEGACY_ENDS = 1 << 20  # records written before full digests: CRC-32 of the first and last MiB


class HashingStream:
    """A binary file opened for writing that digests everything written to it (xxh3-64) and, on close,
    writes ``NAME.xxh3.json`` with the size, digest and writing rank. Sequential writes only: a seek would
    make the digest differ from the file, so it is refused."""

    def __init__(self, path: str | os.PathLike, rank: int | None):
        self.path, self.rank = Path(path), rank
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._hash = xxhash.xxh3_64()
        self._bytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._bytes += len(view)
        return self._file.write(view)

    def tell(self) -> int:
        return self._bytes

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        entry = {"bytes": self._bytes, "xxh3": self._hash.hexdigest(), "rank": self.rank}
        sidecar = self.path.with_name(self.path.name + SIDECAR)
        tmp = sidecar.with_name(f".{sidecar.name}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, sidecar)

    def __enter__(self) -> "HashingStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def digest_file(path: Path) -> str:
    """xxh3-64 of the whole file, read in 8 MiB pieces."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _legacy_ends_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(_LEGACY_ENDS))
        if size > _LEGACY_ENDS:
            f.seek(max(_LEGACY_ENDS, size - _LEGACY_ENDS))
            crc = zlib.crc32(f.read(_LEGACY_ENDS), crc)
    return f"{crc:08x}"


def _files(folder: Path, exclude: tuple[str, ...]) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude
            and not p.name.endswith((SIDECAR, SIDECAR + ".tmp"))]


def collect(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """The record of ``folder``: {relative path: {"bytes", "xxh3", "rank"}} for every file. Digests come
    from the writers' sidecars (which are then removed); a file without one is read and hashed here."""
    record = {}
    for p in _files(folder, exclude):
        sidecar = p.with_name(p.name + SIDECAR)
        entry = None
        if sidecar.is_file():
            entry = json.loads(sidecar.read_text())
            if entry["bytes"] != p.stat().st_size:  # written again by someone else since: not trusted
                entry = None
        record[str(p.relative_to(folder))] = entry or {"bytes": p.stat().st_size, "xxh3": digest_file(p), "rank": None}
    for sidecar in folder.rglob(f"*{SIDECAR}"):
        sidecar.unlink(missing_ok=True)
    return record


def hash_share(folder: Path, rank: int, world: int, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """This rank's share of the record of a folder that others wrote (an HF checkpoint): files dealt out
    largest first to the least loaded rank, so that ``world`` ranks read about equal amounts."""
    files = sorted(_files(folder, exclude), key=lambda p: (-p.stat().st_size, str(p)))
    load, mine = [0] * world, {}
    for p in files:
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += p.stat().st_size
        if owner == rank:
            mine[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "xxh3": digest_file(p), "rank": owner}
    return mine


def problems(folder: Path, files: dict[str, dict] | None, checksums: bool = True,
             mine: Callable[[dict], bool] | None = None) -> list[str]:
    """What in ``folder`` differs from its record (file, what was expected); none for an older checkpoint
    saved without a record. ``checksums=False`` checks presence and sizes only; ``mine`` selects the
    entries this process checks (default: all)."""
    out = []
    for name, want in (files or {}).items():
        if mine is not None and not mine(want):
            continue
        path = folder / name
        if not path.is_file():
            out.append(f"{path}: missing (recorded {want['bytes']:,} bytes)")
        elif (size := path.stat().st_size) != want["bytes"]:
            out.append(f"{path}: {size:,} bytes, recorded {want['bytes']:,}")
        elif checksums and "xxh3" in want and (digest := digest_file(path)) != want["xxh3"]:
            out.append(f"{path}: content changed (xxh3 {digest}, recorded {want['xxh3']})")
        elif checksums and "crc32_ends" in want and (digest := _legacy_ends_digest(path)) != want["crc32_ends"]:
            out.append(f"{path}: checksum {digest}, recorded {want['crc32_ends']}")
    return out


def owned_by(rank: int, world: int) -> Callable[[dict], bool]:
    """The entries ``rank`` verifies among ``world`` ranks: those its index wrote (modulo the world size);
    rank 0 also takes the files no rank wrote (hashed at publish)."""
    return lambda entry: (entry.get("rank") if entry.get("rank") is not None else 0) % world == rank


def first_verified(newest_first: Iterable[Path], problems_of: Callable[[Path], list[str]],
                   say: Callable[[str], None]) -> Path | None:
    """The first checkpoint of ``newest_first`` without problems; each one skipped is said, with why."""
    for path in newest_first:
        found = problems_of(path)
        if not found:
            return path
        say(f"skipping checkpoint {path}: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    return None
