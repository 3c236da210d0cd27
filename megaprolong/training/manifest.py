"""What a complete checkpoint contains, recorded when it is published, and checked before it is loaded.

Every file's size and a fast checksum: CRC-32 of its first and last MiB (a truncation, a bad copy's head or
tail, a zero-filled end are caught without reading the whole, possibly 100 GB, checkpoint). A checkpoint
that does not verify is skipped by ``resume: auto`` (the previous complete one is used) and refused when
named explicitly.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

ENDS = 1 << 20  # bytes read at each end of a file


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(ENDS))
        if size > ENDS:
            f.seek(max(ENDS, size - ENDS))
            crc = zlib.crc32(f.read(ENDS), crc)
    return f"{crc:08x}"


def record(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"bytes": size, "crc32_ends": digest}} for every file under ``folder``."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32_ends": file_digest(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def problems(folder: Path, files: dict[str, dict] | None, checksums: bool = True) -> list[str]:
    """What in ``folder`` differs from its record (file, what was expected); none for an older checkpoint
    saved without a record."""
    out = []
    for name, want in (files or {}).items():
        path = folder / name
        if not path.is_file():
            out.append(f"{path}: missing (recorded {want['bytes']:,} bytes)")
        elif (size := path.stat().st_size) != want["bytes"]:
            out.append(f"{path}: {size:,} bytes, recorded {want['bytes']:,}")
        elif checksums and (digest := file_digest(path)) != want["crc32_ends"]:
            out.append(f"{path}: checksum {digest}, recorded {want['crc32_ends']}")
    return out


def first_verified(newest_first: Iterable[Path], problems_of: Callable[[Path], list[str]],
                   say: Callable[[str], None]) -> Path | None:
    """The first checkpoint of ``newest_first`` without problems; each one skipped is said, with why."""
    for path in newest_first:
        found = problems_of(path)
        if not found:
            return path
        say(f"skipping checkpoint {path}: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    return None
